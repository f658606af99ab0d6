"""The head: a classifier's dense and output layers (C labels; padded labels get a float32-min logit), the
pooling flag head_cls (CLS token or mean), and the `embeddings` output's flags head_max (max pooling) and
head_norm (L2 normalisation); an embedding adapter has C = 0. Layout.embeddings: the graph has the
`embeddings` output. The graph's head computation is exporters/shared.SharedModel's. Merge: unchanged."""

from __future__ import annotations

from .base import NEG, Field, SlotKind, nonzero

# added to layout version 1 with embeddings: a pack written before has none and is a classifier
OPTIONAL = {"head_max": 0.0, "head_norm": 0.0}


class Head(SlotKind):
    name = "head"
    FIELDS = (Field.flag("embeddings"),)
    LEAD = ("head_cls",)
    FILL = {"head_out_b": NEG}
    FLAGS = ("head_cls",)
    EXAMPLE_SIZES = {"C": 3}
    BANK_MIN = {"C": 1}  # a bank of embedding adapters only still has one (float32 min) logit column

    def spec(self):
        return {"head_cls": (), "head_dense_w": ("d", "d"), "head_dense_b": ("d",), "head_out_w": ("C", "d"),
                "head_out_b": ("C",), "head_max": (), "head_norm": ()}

    def names(self, layout):
        return ["head_cls", "head_dense_w", "head_dense_b", "head_out_w", "head_out_b"] + \
            (["head_max", "head_norm"] if layout.embeddings else [])

    def needs(self, t, sizes, slots):
        return {"embeddings": sizes["C"] == 0 or any(nonzero(t, k) for k in OPTIONAL)}

    def sizes(self, model):
        return {"C": model.head.cfg.num_labels}

    def pack(self, t, model, sizes):
        """A classifier's dense and output layers; an embedding head's pooling and normalisation flags (its
        head tensors stay zeros, C = 0)."""
        h = model.head
        c = h.cfg.num_labels
        t["head_cls"].fill_(float(h.cfg.pooling == "cls"))
        if h.cfg.embedding:
            t["head_max"].fill_(float(h.cfg.pooling == "max"))
            t["head_norm"].fill_(float(h.cfg.normalize))
            return
        t["head_dense_w"], t["head_dense_b"] = h.dense.weight.detach().clone(), h.dense.bias.detach().clone()
        t["head_out_w"][:c], t["head_out_b"][:c] = h.out_proj.weight, h.out_proj.bias


HEAD = Head()
