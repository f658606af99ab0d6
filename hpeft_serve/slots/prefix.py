"""Prefix tuning: P key/value vectors per layer that every query attends to (a mask of 0 on a pack's own
positions, float32 min on the padding), optionally gated (UniPELT: the gate scales the prefix's keys and
values). The shared graph widens attention by the positions some row of the batch has, in the rows that have
a prefix only (exporters/segment.py prefix_attention). Merge: ejected to
constant key/value vectors (the reparametrisation MLP is run once)."""

from __future__ import annotations

from .base import NEG, Field, SlotKind, gate_into, gate_names, gate_spec


class Prefix(SlotKind):
    name = "prefix"
    FIELDS = (Field.flag("prefix"),)
    FILL = {"prefix_mask": NEG}
    EXAMPLE_SIZES = {"P": 3}
    MERGE = "ejected to constant key/value vectors"

    def spec(self):
        return {"prefix_k": ("L", "P", "d"), "prefix_v": ("L", "P", "d"), "prefix_mask": ("L", "P")} | \
            gate_spec("prefix", "d")

    def names(self, layout):
        return ["prefix_k", "prefix_v", "prefix_mask"] + gate_names(layout, "prefix") if layout.prefix else []

    def slots(self, sizes):
        return [("prefix", "prefix")] if sizes["P"] > 0 else []

    def needs(self, t, sizes, slots):
        return {"prefix": sizes["P"] > 0}

    def prepare(self, model):
        ad = model.adapters
        if ad.position_offset:
            from ..errors import HpeftError
            raise HpeftError("this adapter shifts token positions by its prefix length (a Hugging Face peft prefix), "
                             "which the shared layout has no slot for: export it with --merge")
        ad.eject_prefix()

    def sizes(self, model):
        ad = model.adapters
        return {"P": ad.prefix.length if ad.prefix is not None else 0}

    def pack(self, t, model, sizes):
        ad = model.adapters
        for i, la in enumerate(ad.layers):
            if la.has_prefix:
                j = ad.prefix_layers.index(i)
                t["prefix_k"][i], t["prefix_v"][i] = ad.prefix.prefix_kv[j, 0], ad.prefix.prefix_kv[j, 1]
                t["prefix_mask"][i] = 0.0
                gate_into(t, "prefix", i, la.prefix_gate)

    def kinds(self, layout, ex):
        if not (layout.prefix and "prefix" in layout.gated):
            return []
        import torch
        from exporters.shared import Rows
        names = gate_names(layout, "prefix")

        def fn(_, x, tmask, index, ws):  # (R, 1, 1): the gate where gated, else 1
            return Rows(dict(zip(names, ws)), index, layout, tmask).coef("prefix", x, None)
        return [("prefix", fn, names, [torch.zeros(2, 1, 1), ex.rand(2, 3, ex.dim["d"]), ex.tm[0]])]

    def prefix(self, bl, x, ctx):
        if not bl.layout.prefix:
            return None
        from exporters.shared import _col
        full = bl.w("prefix_mask")  # (B, P): 0 on a row's prefix positions, float32 min elsewhere
        cols = (full.amax(dim=0) > 0.5 * NEG).nonzero().squeeze(1)  # the positions some row has: (P',)
        k = bl.w("prefix_k").index_select(1, cols)  # (B, P', D)
        v = bl.w("prefix_v").index_select(1, cols)
        mask = full.index_select(1, cols)
        if "prefix" in bl.layout.gated:  # a row without a prefix keeps coef 0: its positions are masked
            use = (full > 0.5 * NEG).to(x.dtype).sum(dim=1)  # (B,): a row's prefix positions (P may be 0)
            coef = bl._run("prefix", _col(use), [x], ctx)
            k, v = coef * k, coef * v
        return k, v, mask

    def prefix_attention(self, bl, q, k, v, pre, mask_add, scale):
        if not bl.layout.prefix:
            return None
        from exporters.segment import prefix_attention
        u, j = bl.usage, bl.usage.col[f"prefix.{bl.i}"]
        b, h, _, dh = q.shape
        pk, pv, pmask = pre
        heads = lambda t: t.view(b, t.shape[1], h, dh).transpose(1, 2)  # noqa: E731
        return prefix_attention(q, k, v, heads(pk), heads(pv), pmask, mask_add, u.every[j], u.some[j], u.uses[j],
                                scale)

    def merge_model(self, m, fold_phm):
        m.adapters.eject_prefix()


PREFIX = Prefix()
