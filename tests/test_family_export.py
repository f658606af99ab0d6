"""Every method on DistilBERT, ELECTRA and DeBERTa-v3 (the tiny random backbones): it trains (a step changes
only adapter and head parameters, with the paper's parameter counts), and its merged ONNX export and the
family's shared graph (one graph for all methods, run in onnxruntime, also on a batch mixing adapters)
equal the PyTorch forward (fp32, <= 1e-5) on padded batches of mixed lengths, including sizes not seen at
export. The helpers are tests/test_export.py's and tests/test_methods.py's.

Training runs the whole table (family x method); the exports run a subset that holds every method at least
once and gives DeBERTa (its own attention) the most rows; HPEFT_FULL_TABLE=1 exports the whole table."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

from exporters.export import export_checkpoint
from hpeft_serve import checkpoint
from hpeft_serve.backbone import load_backbone

from .test_export import TOL, _bank, _batches, _make_ckpt, _ort, _reference, _run_shared
from .test_methods import EXPECTED, _model, _step

FAMILIES = ("tiny-distilbert", "tiny-electra", "tiny-deberta-v2")
METHODS = ("lora", "unipelt", "mam", "compacter_pp", "prefix", "adapter", "bitfit", "s4")
CASES = [(f, m) for f in FAMILIES for m in METHODS]
IDS = [f"{m}@{f[5:]}" for f, m in CASES]
SUBSET = {"tiny-deberta-v2": ("unipelt", "mam", "compacter_pp", "bitfit"),  # gated LoRA on q/k reaches the
          "tiny-electra": ("lora", "prefix", "s4"),                        # relative embeddings (share_att_key)
          "tiny-distilbert": ("adapter", "unipelt", "bitfit")}
EXPORTED = CASES if os.environ.get("HPEFT_FULL_TABLE") else [(f, m) for f, m in CASES if m in SUBSET[f]]
EXPORTED_IDS = [f"{m}@{f[5:]}" for f, m in EXPORTED]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-ckpts")
    return {(f, m): _make_ckpt(load_backbone(f), m, root / f"{f[5:]}-{m}", labels=2 + i % 2, seed=i)
            for i, (f, m) in enumerate(CASES) if (f, m) in EXPORTED}


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory, ckpts):
    """One shared ONNX graph per family, every method's pack exported into it."""
    dirs = {}
    for f in FAMILIES:
        d = tmp_path_factory.mktemp(f"shared-{f}")
        for m in [m for g, m in EXPORTED if g == f]:
            export_checkpoint(ckpts[f, m], d, "onnx", log=lambda *_: None)
        dirs[f] = d
    return dirs


@functools.lru_cache(maxsize=None)
def _references(ck) -> list[np.ndarray]:
    """The PyTorch logits of a checkpoint on each of _batches() (loaded once)."""
    model, _ = checkpoint.load(ck)
    with torch.no_grad():
        return [model(ids, mask).numpy() for ids, mask in _batches()]


@pytest.mark.parametrize("family,method", CASES, ids=IDS)
def test_method_trains_on_the_family(family, method, tokenizer, task):
    backbone = load_backbone(family)
    model = _model(backbone, method)
    c = backbone.config
    assert sum(p.numel() for p in model.adapters.parameters() if p.requires_grad) == \
        EXPECTED[method](c.hidden_size, c.intermediate_size, c.num_hidden_layers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, tokenizer, task)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert any(k.startswith("adapters.") for k in changed), "the adapter did not train"
    assert all(k.startswith(("adapters.", "head.")) for k in changed), sorted(changed)[:5]


@pytest.mark.parametrize("family,method", EXPORTED, ids=EXPORTED_IDS)
def test_merged_onnx_equals_pytorch(family, method, ckpts, tmp_path):
    ck = ckpts[family, method]
    export_checkpoint(ck, tmp_path, "onnx", merged=True, log=lambda *_: None)
    sess = _ort(tmp_path / f"{ck.name}.onnx")
    for (ids, mask), ref in zip(_batches(), _references(ck)):
        got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert np.abs(got - ref).max() <= TOL


@pytest.mark.parametrize("family,method", EXPORTED, ids=EXPORTED_IDS)
def test_shared_graph_equals_pytorch(family, method, ckpts, shared_dirs):
    ck = ckpts[family, method]
    bank = _bank(shared_dirs[family], [ck.name])
    for (ids, mask), ref in zip(_batches(), _references(ck)):
        got = _run_shared("onnx", shared_dirs[family], ids, mask, torch.zeros(len(ids), dtype=torch.long), bank)
        assert np.abs(got[:, :ref.shape[1]] - ref).max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_each_adapter_alone(family, ckpts, shared_dirs):
    cks = [ckpts[family, m] for m in SUBSET[family]]
    bank = _bank(shared_dirs[family], [ck.name for ck in cks])
    ids, mask = _batches()[1]
    idx = torch.tensor([0, 2, 1, 0, 2])  # three different methods in one batch
    mixed = _run_shared("onnx", shared_dirs[family], ids, mask, idx, bank)
    for r, k in enumerate(idx.tolist()):
        alone = _reference(cks[k], (ids[r:r + 1], mask[r:r + 1]))
        assert np.abs(mixed[r:r + 1, :alone.shape[1]] - alone).max() <= TOL


@pytest.mark.parametrize("method", ["unipelt"])
def test_deberta_torchscript_merged_and_shared_equal_pytorch(method, ckpts, tmp_path):
    """DeBERTa's relative-position tables and gathers also trace to TorchScript (sizes not seen at export)."""
    ck = ckpts["tiny-deberta-v2", method]
    export_checkpoint(ck, tmp_path / "m", "torchscript", merged=True, log=lambda *_: None)
    export_checkpoint(ck, tmp_path / "s", "torchscript", log=lambda *_: None)
    merged = torch.jit.load(str(tmp_path / "m" / f"{ck.name}.pt"))
    bank = _bank(tmp_path / "s", [ck.name])
    for (ids, mask), ref in zip(_batches(), _references(ck)):
        assert np.abs(merged(ids, mask).numpy() - ref).max() <= TOL
        got = _run_shared("torchscript", tmp_path / "s", ids, mask, torch.zeros(len(ids), dtype=torch.long), bank)
        assert np.abs(got[:, :ref.shape[1]] - ref).max() <= TOL
