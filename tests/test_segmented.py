"""Row-segmented slot compute (exporters/segment.py): a shared graph runs each slot kind only for the rows
whose adapter uses it. Exact (fp32 <= 1e-5 vs each row's PyTorch forward, padded batches of mixed lengths)
in ONNX and TorchScript whether a kind is used by some rows, by every row or by none, and for a row whose
adapter has all-zero weights (or a zero scale) for a kind; a TorchScript trace taken on a batch where
some kinds are used by no row does not bake in that batch's row sets."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from exporters.export import export_checkpoint, read_layout
from exporters.layout import bank_feed, stack
from exporters.shared import SharedModel
from exporters.torchscript import export_torchscript
from hpeft_serve import checkpoint
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.training import build_model
from .conftest import mixed_lengths

TOL = 1e-5
# every slot kind: LoRA q/v (gated), prefix (gated, two lengths), sequential (dense and PHM), parallel, BitFit
METHODS = ("unipelt", "mam", "compacter", "lora", "s4", "adapter", "bitfit", "prefix")


def _ckpt(backbone, method, folder, seed, zero=(), **overrides):
    """A checkpoint whose adapter tensors are all non-zero, except parameters whose name holds one of `zero`."""
    model = build_model(backbone, resolve(method, backbone.config.num_hidden_layers, overrides), HeadConfig(2), seed)
    model.adapters.eject_prefix()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.adapters.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            if any(z in name for z in zero):
                p.zero_()
    return checkpoint.save(model, backbone, folder / f"{method}-{seed}", ("a", "b"), {})


@pytest.fixture(scope="module")
def adapters(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    cks = [_ckpt(tiny_bert, m, root / "ck", i) for i, m in enumerate(METHODS)]
    # all-zero weights for a kind: LoRA B and the adapters' up-projections (the kinds then add exactly 0)
    cks.append(_ckpt(tiny_bert, "unipelt", root / "ck", 50, zero=("lora_B", "adapter_up")))
    # LoRA on every projection: ffn_in (d -> f) and ffn_out (f -> d) are not square
    cks.append(_ckpt(tiny_bert, "lora", root / "ck", 60, targets=("q", "k", "v", "o", "ffn_in", "ffn_out")))
    refs = {}
    for ck in cks:
        model, _ = checkpoint.load(ck)
        refs[ck.name] = model.eval()
    dirs = {}
    for fmt in ("onnx", "torchscript"):
        for ck in cks:
            export_checkpoint(ck, root / fmt, fmt, log=lambda *_: None)
        dirs[fmt] = root / fmt
    return [ck.name for ck in cks], refs, dirs


def _bank(folder, names):
    return stack([(load_file(str(folder / "packs" / f"{n}.safetensors")),
                   json.loads((folder / "packs" / f"{n}.json").read_text())["sizes"]) for n in names])


def _batch(b, s, seed):
    return mixed_lengths(b, s, seed)


def _run(fmt, folder, ids, mask, idx, feed):
    if fmt == "onnx":
        sess = ort.InferenceSession(str(folder / "backbone.onnx"), providers=["CPUExecutionProvider"])
        base = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "adapter_index": idx.numpy()}
        return sess.run(["logits"], base | {n: v.numpy() for n, v in feed.items()})[0]
    return torch.jit.load(str(folder / "backbone.pt"))(ids, mask, idx, *feed.values())[0].numpy()


def _check(got, names, refs, idx, ids, mask):
    with torch.no_grad():
        for r, k in enumerate(idx.tolist()):
            want = refs[names[k]](ids[r:r + 1], mask[r:r + 1]).numpy()
            assert np.abs(got[r:r + 1, :2] - want).max() <= TOL, (r, names[k])


# rows of: every method once and two again; one method (every row uses its kinds); LoRA only (prefix,
# adapters, PHM, BitFit used by no row); the adapter with zero kinds beside its all-non-zero twin
BATCHES = {"all methods": [0, 1, 2, 3, 4, 5, 6, 7, 2, 1], "one method": [0, 0, 0],
           "kinds used by no row": [3, 3], "zero weights": [8, 0, 8]}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_mixed_batches_equal_each_rows_pytorch_forward(fmt, adapters):
    names, refs, dirs = adapters
    folder = dirs[fmt]
    feed = bank_feed(_bank(folder, names), read_layout(folder))
    for j, rows in enumerate(BATCHES.values()):
        idx = torch.tensor(rows)
        ids, mask = _batch(len(rows), 13 + 2 * j, seed=j)
        _check(_run(fmt, folder, ids, mask, idx, feed), names, refs, idx, ids, mask)


def test_onnx_graph_skips_kinds_with_if(adapters):
    m = onnx.load(str(adapters[2]["onnx"] / "backbone.onnx"), load_external_data=False)
    ifs = [n for n in m.graph.node if n.op_type == "If"]
    layout = read_layout(adapters[2]["onnx"])
    kinds = len(layout.lora) + len(layout.seq) + len(layout.par) + len(layout.phm) * len(layout.phm_n)
    kinds += int("prefix" in layout.gated)  # the prefix gate
    assert layout.lora and layout.seq and layout.par and layout.phm and layout.prefix and layout.bitfit
    # tiny-bert has 2 layers: one If per kind per layer, one for the prefix's attention (only the rows that
    # have a prefix attend to its positions: exporters/segment.py prefix_attention), and BitFit's for each
    # sub-layer's LayerNorm (its FFN projection: not here, LoRA also changes it)
    assert "ffn_in" in layout.lora
    assert len(ifs) == (kinds + 1 + 2) * 2
    # which rows use each (kind, layer) is worked out once: the every-row and some-row flag vectors are
    # each Split once into one condition per (kind, layer), and no If gathers or reduces its own flags
    columns = kinds + 1  # and BitFit's: any bias delta in the layer
    splits = [n for n in m.graph.node if n.op_type == "Split" and len(n.output) == columns * 2]
    assert len(splits) == 2
    conds = {o for n in splits for o in n.output}
    conds |= {n.output[0] for n in m.graph.node if n.op_type == "Cast" and n.input[0] in conds}  # bool()
    assert {n.input[0] for n in ifs} <= conds
    for n in ifs:  # the every-row branch runs the kind on the whole batch: no NonZero, no ScatterND
        then = next(a.g for a in n.attribute if a.name == "then_branch")
        assert not {x.op_type for x in then.node} & {"NonZero", "ScatterND", "ReduceMin", "ReduceMax"}, n.name


def test_trace_on_a_batch_without_some_kinds_keeps_every_path(adapters, tiny_bert, tmp_path):
    """TorchScript traced where only LoRA rows are in the batch, then run where every kind is used."""
    names, refs, dirs = adapters
    layout = read_layout(dirs["torchscript"])
    model = SharedModel(refs[names[3]].encoder, layout)
    feed = bank_feed(_bank(dirs["torchscript"], names), layout)
    ids, mask = _batch(2, 9, seed=7)
    path = export_torchscript(model, (ids, mask, torch.tensor([3, 3]), *feed.values()), tmp_path / "traced.pt")
    traced = torch.jit.load(str(path))
    for rows in BATCHES.values():
        idx = torch.tensor(rows)
        ids, mask = _batch(len(rows), 11, seed=len(rows))
        _check(traced(ids, mask, idx, *feed.values())[0].numpy(), names, refs, idx, ids, mask)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_bitfit_per_layer_if_keeps_the_frozen_ops_where_no_row_has_a_delta(fmt, tiny_bert, tmp_path, capfd):
    """BitFit's per-layer If (exporters/shared.py build_choices): with no LoRA on the FFN projection, the FFN
    projection and activation and both LayerNorms take the frozen module's ops in a layer where no row has a
    bias delta, and each row's delta where some row has one; exact either way (S4 has BitFit in its last
    layer groups only, so its rows take both paths in one forward)."""
    cks = [_ckpt(tiny_bert, m, tmp_path / "ck", 70 + i) for i, m in enumerate(("bitfit", "lora", "s4"))]
    refs = {ck.name: checkpoint.load(ck)[0].eval() for ck in cks}
    names = [ck.name for ck in cks]
    for ck in cks:
        export_checkpoint(ck, tmp_path / fmt, fmt, log=lambda *_: None)
    folder = tmp_path / fmt
    layout = read_layout(folder)
    assert layout.bitfit and "ffn_in" not in layout.lora
    if fmt == "onnx":  # one If per layer for the FFN projection + activation, one per LayerNorm
        m = onnx.load(str(folder / "backbone.onnx"), load_external_data=False)
        ifs = [n for n in m.graph.node if n.op_type == "If"]
        gelu = [n for n in ifs if any(x.op_type in ("Gelu", "Erf") for a in n.attribute if a.name == "else_branch"
                                      for x in a.g.node)]
        assert len(gelu) == tiny_bert.config.num_hidden_layers
        capfd.readouterr()
        ort.InferenceSession(str(folder / "backbone.onnx"), providers=["CPUExecutionProvider"])
        assert "cannot be safely updated" not in capfd.readouterr().err  # onnxruntime's optimizer, once per layer
    feed = bank_feed(_bank(folder, names), layout)
    for j, rows in enumerate(([0, 1, 2, 1], [1, 1], [0], [2, 1])):  # some, none, every, S4's layers
        idx = torch.tensor(rows)
        ids, mask = _batch(len(rows), 9 + j, seed=20 + j)
        _check(_run(fmt, folder, ids, mask, idx, feed), names, refs, idx, ids, mask)
