"""The slot-kind registry (hpeft_serve/slots/registry.py), driven by a table with one row per registered kind
(a new kind without a row fails the first test): for each kind, an adapter using it packs to tensors the
kind declares and round-trips through a compact pack file; its Layout (needs) has the kind's fields, names
the kind's bank tensors, survives union and backbone.json; the shared graph (PyTorch with the traced
segmented kinds, and ONNX) equals the adapter's PyTorch forward (fp32 <= 1e-5, padded batches of mixed
lengths), its rows alone and mixed with every other kind's; and its merge rule is exact and folds away
what it says it folds."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load as load_np
from safetensors.numpy import save as save_np

from exporters.export import write_shared_graph
from exporters.layout import _pack, bank_feed, pack, stack
from exporters.merge import merge
from exporters.shared import SharedModel
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.pack.layout import FIELDS, FILL, Layout, complete, is_fill, needs, spec
from hpeft_serve.slots.registry import KINDS
from hpeft_serve.training import build_model
from .conftest import mixed_lengths

TOL = 1e-5
ALL = ("q", "k", "v", "o", "ffn_in", "ffn_out")
CLS, EMB = HeadConfig(2), HeadConfig(0, pooling="max", task="embedding", normalize=True)

# kind -> (method, overrides, head, what merging folds away: la -> True once gone; None: kept as ops)
TABLE = {
    "gates": ("unipelt", {}, CLS, None),
    "lora": ("lora", {"targets": ALL}, CLS, lambda la: not la.lora),
    "prefix": ("prefix", {"length": 3}, CLS, None),
    "seq": ("adapter", {}, CLS, None),
    "par": ("parallel_adapter", {}, CLS, None),
    "phm": ("compacter", {}, CLS, None),
    "bitfit": ("bitfit", {}, CLS, lambda la: la.bitfit is None),
    "ia3": ("ia3", {"targets": ALL}, CLS, lambda la: la.ia3 is None),
    "head": ("lora", {}, EMB, lambda la: not la.lora),
}
NAMES = [k.name for k in KINDS]


def _model(backbone, kind: str, seed: int):
    method, over, head, _ = TABLE[kind]
    model = build_model(backbone, resolve(method, backbone.config.num_hidden_layers, over), head, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.adapters.eject_prefix()
    return model.eval()


def _batch(b: int, s: int, seed: int):
    return mixed_lengths(b, s, seed)


def _ref(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, mask)  # logits, or an embedding head's embeddings


@pytest.fixture(scope="module")
def world(tiny_bert, tmp_path_factory):
    """Every row's model and pack, the union layout, its SharedModel and its ONNX graph."""
    models = {k: _model(tiny_bert, k, i) for i, k in enumerate(NAMES)}
    packs = {k: pack(m) for k, m in models.items()}
    layout = Layout()
    for t, s in packs.values():
        layout = layout.union(needs(t, s))
    enc = next(iter(models.values())).encoder
    out = tmp_path_factory.mktemp("registry")
    backbone = {"name": "tiny-bert", "sha256": "-", "num_layers": tiny_bert.config.num_hidden_layers}
    write_shared_graph(enc, backbone, layout, out, "onnx")
    sess = ort.InferenceSession(str(out / "backbone.onnx"), providers=["CPUExecutionProvider"])
    return models, packs, layout, SharedModel(enc, layout), sess


def test_the_table_has_a_row_per_kind_and_kinds_declare_disjoint_tensors_and_fields():
    assert sorted(TABLE) == sorted(NAMES) and len(set(NAMES)) == len(NAMES)
    declared = [n for k in KINDS for n in k.spec()]
    assert len(declared) == len(set(declared)) and set(declared) == set(spec())
    fields = [f.name for f in FIELDS]
    assert len(fields) == len(set(fields)) and fields == [f.name for f in dataclasses.fields(Layout)]


@pytest.mark.parametrize("kind", NAMES)
def test_pack_round_trip(kind, world):
    models, packs, *_ = world
    t, sizes = packs[kind]
    k = next(x for x in KINDS if x.name == kind)
    assert any(n in t for n in k.spec()), f"{kind}: the pack fills none of the kind's tensors"
    with torch.no_grad():
        whole, _ = _pack(models[kind])
    raw = save_np({n: v.numpy() for n, v in t.items()})  # a compact pack file
    back = complete(load_np(raw), sizes)
    assert set(back) == set(spec()) and all(not is_fill(n, v) for n, v in t.items())
    for n, v in whole.items():
        assert np.array_equal(back[n], v.numpy()), (kind, n)
    assert all(is_fill(n, whole[n]) for n in spec() if n not in t and n in FILL)


@pytest.mark.parametrize("kind", NAMES)
def test_layout_covers_the_kind(kind, world):
    _, packs, union, *_ = world
    k = next(x for x in KINDS if x.name == kind)
    lay = needs(*packs[kind])
    own = {f.name for f in k.FIELDS}
    assert any(getattr(lay, f) for f in own), f"{kind}: the pack's layout has none of the kind's fields"
    assert set(k.names(lay)) <= set(lay.names()) and k.names(lay)
    assert Layout().union(lay) == lay and lay.covers(Layout()) and union.covers(lay)
    assert Layout.from_dict(lay.to_dict()) == lay and Layout.from_dict(union.to_dict()) == union
    assert not Layout().covers(lay)  # an empty layout lacks the kind


@pytest.mark.parametrize("kind", NAMES)
def test_shared_graph_alone_and_mixed_equals_pytorch(kind, world):
    models, packs, layout, shared, sess = world
    order = list(models)
    bank = stack(list(packs.values()), layout)
    feed = bank_feed(bank, layout)
    j = order.index(kind)
    for rows in ([j, j, j], [j] + [i for i in range(len(order)) if i != j]):  # alone; beside every other kind
        idx = torch.tensor(rows)
        ids, mask = _batch(len(rows), 11, seed=j)
        with torch.no_grad():
            got_pt = shared.run(ids, mask, idx, bank)
        base = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "adapter_index": idx.numpy()}
        got_onnx = sess.run(["logits", "embeddings"], base | {n: v.numpy() for n, v in feed.items()})
        for r, i in enumerate(rows):
            m = models[order[i]]
            want = _ref(m, ids[r:r + 1], mask[r:r + 1]).numpy()
            c = m.head.cfg.num_labels
            for logits, emb in ((got_pt[0].numpy(), got_pt[1].numpy()), got_onnx):
                got = logits[r:r + 1, :c] if c else emb[r:r + 1]
                assert np.abs(got - want).max() <= TOL, (kind, r, order[i])


@pytest.mark.parametrize("kind", NAMES)
def test_merge_rule_is_exact(kind, world):
    models = world[0]
    model, gone = models[kind], TABLE[kind][3]
    merged = merge(model)
    ids, mask = _batch(3, 9, seed=7)
    assert np.abs(_ref(merged, ids, mask).numpy() - _ref(model, ids, mask).numpy()).max() <= TOL
    if gone is not None:
        assert all(gone(la) for la in merged.adapters.layers), f"{kind}: merging left the slot in place"
