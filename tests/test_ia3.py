"""(IA)^3 (hpeft_serve/methods/ia3.py): a new adapter is the plain backbone; a trained one changes the
forward; merging folds it exactly (alone and beside LoRA and BitFit on the same projections); merged ONNX and
a shared graph (ONNX, TorchScript), alone and in batches mixing it with other methods, equal each row's
PyTorch forward (fp32 <= 1e-5, padded batches of mixed lengths)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from exporters.export import export_checkpoint, read_layout
from exporters.layout import bank_feed, stack
from exporters.merge import merge
from hpeft_serve import checkpoint
from hpeft_serve.errors import ConfigError
from hpeft_serve.methods.config import BitFitConfig, IA3Config, LoRAConfig, MethodConfig, component_from_dict
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.training import build_model
from .conftest import mixed_lengths

TOL = 1e-5
ALL = ("q", "k", "v", "o", "ffn_in", "ffn_out")
# (IA)^3 on every projection, LoRA (ungated, so merged into the weight) and BitFit on the same projections
HYBRID = MethodConfig("ia3_lora_bitfit", (IA3Config(ALL), LoRAConfig(4, 8.0, ("q", "v", "o", "ffn_out")),
                                           BitFitConfig()))


def _perturbed(backbone, method, seed):
    model = build_model(backbone, method, HeadConfig(2), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _batch(b, s, seed):
    return mixed_lengths(b, s, seed, step=3)


def test_new_ia3_is_the_backbone_and_a_trained_one_is_not(tiny_bert):
    ids, mask = _batch(3, 9, 0)
    fresh = build_model(tiny_bert, resolve("ia3", 2), HeadConfig(2), 0).eval()
    plain = build_model(tiny_bert, MethodConfig("none", ()), HeadConfig(2), 0).eval()
    with torch.no_grad():
        assert torch.equal(fresh.encoder(ids, mask, fresh.adapters), plain.encoder(ids, mask, plain.adapters))
        trained = _perturbed(tiny_bert, resolve("ia3", 2), 0)
        assert (trained.encoder(ids, mask, trained.adapters) - plain.encoder(ids, mask, plain.adapters)).abs().max() > 1e-3
    assert set(fresh.adapters.layers[0].ia3) == {"k", "v", "ffn_out"}
    assert fresh.adapters.layers[0].ia3["ffn_out"].shape == (tiny_bert.config.intermediate_size,)


def test_bad_targets_are_refused_by_name():
    with pytest.raises(ConfigError, match="ia3: targets"):
        component_from_dict({"type": "ia3", "targets": ["k", "ffn"]})


@pytest.mark.parametrize("method", ["ia3", "hybrid"])
def test_merge_is_exact_and_leaves_no_ia3(method, tiny_bert, tmp_path):
    mc = resolve("ia3", 2) if method == "ia3" else HYBRID
    model = _perturbed(tiny_bert, mc, 3)
    merged = merge(model)
    assert all(la.ia3 is None and la.bitfit is None and not la.lora for la in merged.adapters.layers)
    ck = checkpoint.save(model, tiny_bert, tmp_path / "ck" / method, ("a", "b"), {})
    export_checkpoint(ck, tmp_path / "m", "onnx", merged=True, log=lambda *_: None)
    sess = ort.InferenceSession(str(tmp_path / "m" / f"{method}.onnx"), providers=["CPUExecutionProvider"])
    for ids, mask in (_batch(4, 13, 1), _batch(1, 5, 2)):
        with torch.no_grad():
            ref = model(ids, mask).numpy()
            assert np.abs(merged(ids, mask).numpy() - ref).max() <= TOL
        got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert np.abs(got - ref).max() <= TOL


@pytest.fixture(scope="module")
def shared(tiny_bert, tmp_path_factory):
    """ia3, the hybrid and three other methods in one shared folder per format."""
    root = tmp_path_factory.mktemp("ia3")
    methods = {"ia3": resolve("ia3", 2), "hybrid": HYBRID, "unipelt": resolve("unipelt", 2),
               "compacter": resolve("compacter", 2), "mam": resolve("mam", 2)}
    refs, cks = {}, []
    for i, (name, mc) in enumerate(methods.items()):
        model = _perturbed(tiny_bert, mc, 10 + i)
        model.adapters.eject_prefix()
        cks.append(checkpoint.save(model, tiny_bert, root / "ck" / name, ("a", "b"), {}))
        refs[name], _ = checkpoint.load(cks[-1])
    dirs = {}
    for fmt in ("onnx", "torchscript"):
        for ck in cks:
            export_checkpoint(ck, root / fmt, fmt, log=lambda *_: None)
        dirs[fmt] = root / fmt
    return list(methods), refs, dirs


def _run(fmt, folder, names, ids, mask, idx):
    bank = stack([(load_file(str(folder / "packs" / f"{n}.safetensors")),
                   json.loads((folder / "packs" / f"{n}.json").read_text())["sizes"]) for n in names])
    feed = bank_feed(bank, read_layout(folder))
    if fmt == "onnx":
        sess = ort.InferenceSession(str(folder / "backbone.onnx"), providers=["CPUExecutionProvider"])
        base = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "adapter_index": idx.numpy()}
        return sess.run(["logits"], base | {n: v.numpy() for n, v in feed.items()})[0]
    return torch.jit.load(str(folder / "backbone.pt"))(ids, mask, idx, *feed.values())[0].numpy()


# ia3 alone; the hybrid alone; every method mixed (ia3 rows beside rows without it, and the reverse)
BATCHES = {"ia3 alone": [0, 0, 0], "hybrid alone": [1, 1], "mixed": [0, 2, 1, 3, 4, 0, 1]}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_shared_graph_alone_and_mixed_equals_pytorch(fmt, shared):
    names, refs, dirs = shared
    layout = read_layout(dirs[fmt])
    assert layout.ia3 == ALL and layout.lora and layout.prefix and layout.phm_n
    for j, rows in enumerate(BATCHES.values()):
        idx = torch.tensor(rows)
        ids, mask = _batch(len(rows), 11 + 2 * j, seed=20 + j)
        got = _run(fmt, dirs[fmt], names, ids, mask, idx)
        with torch.no_grad():
            for r, k in enumerate(rows):
                want = refs[names[k]](ids[r:r + 1], mask[r:r + 1]).numpy()
                assert np.abs(got[r:r + 1, :2] - want).max() <= TOL, (fmt, r, names[k])
