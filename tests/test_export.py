"""Export: every method x (merged, shared) x (ONNX, TorchScript) equals the PyTorch forward (fp32, <= 1e-5)
on padded batches of mixed lengths, including a batch size and length not seen at export; a shared graph
run on a batch mixing three methods equals each adapter alone; the custom ops carry bodies equal to the
torch ops; the files load with no hpeft code importable."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from exporters.export import export_checkpoint, read_layout
from exporters.layout import bank_feed, stack
from hpeft_serve import checkpoint
from hpeft_serve.methods.presets import method_names, resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.training import build_model

TOL = 1e-5
METHODS = method_names()
ROBERTA = ("unipelt", "compacter", "lora")


def _batches():
    """(3 x 11) padded like the export example, and (5 x 23) / (1 x 4): sizes not seen at export."""
    out = []
    for b, s, seed in ((3, 11, 0), (5, 23, 1), (1, 4, 2)):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1000, 5000, (b, s), generator=g)
        mask = torch.ones(b, s, dtype=torch.long)
        for r in range(1, b):
            mask[r, max(2, s - 3 * r):] = 0
        out.append((ids, mask))
    return out


def _make_ckpt(backbone, method, folder, labels=2, seed=0, **overrides):
    model = build_model(backbone, resolve(method, backbone.config.num_hidden_layers, overrides), HeadConfig(labels), seed)
    model.adapters.eject_prefix()
    with torch.no_grad():  # every part non-zero (zero-initialised up-projections and LoRA B included)
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for proj in model.adapters.sparse_projections():  # a SparseAdapter pruned as training would
            proj.sparse_mask.copy_(torch.rand(proj.weight.shape, generator=g) > 0.4)
            proj.weight.mul_(proj.sparse_mask)
    return checkpoint.save(model, backbone, folder, tuple(f"l{i}" for i in range(labels)), {})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_bert, tiny_roberta):
    root = tmp_path_factory.mktemp("ckpts")
    out = {m: _make_ckpt(tiny_bert, m, root / m, seed=i) for i, m in enumerate(METHODS)}
    out |= {f"{m}@roberta": _make_ckpt(tiny_roberta, m, root / f"{m}-rob", labels=3) for m in ROBERTA}
    return out


def _reference(ckpt, batch):
    """The PyTorch forward of a checkpoint on (input_ids, attention_mask), torch or numpy."""
    model, _ = checkpoint.load(ckpt)
    with torch.no_grad():
        return model(*(torch.as_tensor(t) for t in batch)).numpy()


def _ort(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


CASES = METHODS + [f"{m}@roberta" for m in ROBERTA]


@pytest.mark.parametrize("key", CASES)
def test_merged_onnx_and_torchscript_equal_pytorch(key, ckpts, tmp_path):
    ck = ckpts[key]
    export_checkpoint(ck, tmp_path / "onnx", "onnx", merged=True, log=lambda *_: None)
    export_checkpoint(ck, tmp_path / "ts", "torchscript", merged=True, log=lambda *_: None)
    name = ck.name
    sess = _ort(tmp_path / "onnx" / f"{name}.onnx")
    ts = torch.jit.load(str(tmp_path / "ts" / f"{name}.pt"))
    for ids, mask in _batches():
        ref = _reference(ck, (ids, mask))
        got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert np.abs(got - ref).max() <= TOL
        assert np.abs(ts(ids, mask).numpy() - ref).max() <= TOL
    pt2 = tmp_path / "ts" / f"{name}.pt2"
    if pt2.exists():
        ep = torch.export.load(str(pt2))
        ids, mask = _batches()[1]
        assert np.abs(ep.module()(ids, mask).detach().numpy() - _reference(ck, (ids, mask))).max() <= TOL


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory, ckpts):
    dirs = {}
    for fmt in ("onnx", "torchscript"):
        d = tmp_path_factory.mktemp(f"shared-{fmt}")
        for m in METHODS:
            export_checkpoint(ckpts[m], d, fmt, log=lambda *_: None)
        dirs[fmt] = d
    return dirs


def _bank(folder, names):
    packs = [(load_file(str(folder / "packs" / f"{n}.safetensors")),
              json.loads((folder / "packs" / f"{n}.json").read_text())["sizes"]) for n in names]
    return stack(packs)


def _run_shared(fmt, folder, ids, mask, idx, bank):
    feed = bank_feed(bank, read_layout(folder))
    if fmt == "onnx":
        base = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "adapter_index": idx.numpy()}
        return _ort(folder / "backbone.onnx").run(["logits"], base | {n: v.numpy() for n, v in feed.items()})[0]
    return torch.jit.load(str(folder / "backbone.pt"))(ids, mask, idx, *feed.values())[0].numpy()  # (logits, embeddings)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("method", METHODS)
def test_shared_graph_equals_pytorch(method, fmt, ckpts, shared_dirs):
    folder = shared_dirs[fmt]
    bank = _bank(folder, [method])
    for ids, mask in _batches():
        ref = _reference(ckpts[method], (ids, mask))
        got = _run_shared(fmt, folder, ids, mask, torch.zeros(len(ids), dtype=torch.long), bank)
        assert np.abs(got[:, :ref.shape[1]] - ref).max() <= TOL


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_mixed_batch_equals_each_adapter_alone(fmt, ckpts, shared_dirs):
    folder = shared_dirs[fmt]
    names = ["compacter", "mam", "sparse_adapter"]  # PHM, prefix + parallel, sparse: three different methods
    bank = _bank(folder, names + ["unipelt", "lora"])  # a bank larger than the batch needs
    ids, mask = _batches()[1]
    idx = torch.tensor([0, 2, 1, 0, 2])
    mixed = _run_shared(fmt, folder, ids, mask, idx, bank)
    for r, k in enumerate(idx.tolist()):
        alone = _reference(ckpts[names[k]], (ids[r:r + 1], mask[r:r + 1]))
        assert np.abs(mixed[r:r + 1, :2] - alone).max() <= TOL


def test_second_adapter_reuses_the_graph_and_new_slots_extend_it(ckpts, tiny_bert, tmp_path):
    logs = []
    export_checkpoint(ckpts["lora"], tmp_path, "onnx", log=logs.append)
    data = tmp_path / "backbone.onnx.data"
    stamp = data.stat().st_mtime_ns
    other = _make_ckpt(tiny_bert, "lora", tmp_path / "ck" / "lora2", seed=9)
    export_checkpoint(other, tmp_path, "onnx", log=logs.append)  # same slots: only a pack is written
    assert data.stat().st_mtime_ns == stamp and any("reusing" in x for x in logs)
    assert (tmp_path / "packs" / "lora.safetensors").stat().st_size < 0.02 * data.stat().st_size  # packs are small
    assert "prefix_k" not in read_layout(tmp_path).names()  # a slot no adapter uses is not in the graph
    export_checkpoint(ckpts["mam"], tmp_path, "onnx", log=logs.append)  # needs prefix + parallel adapter
    assert any("re-exporting" in x for x in logs)
    names = read_layout(tmp_path).names()
    assert read_layout(tmp_path).names() and "prefix_k" in names and "lora_q_A" in names and "par_ffn_down_w" in names
    assert sorted(p.name for p in (tmp_path / "packs").iterdir()) == [
        "lora.json", "lora.safetensors", "lora2.json", "lora2.safetensors", "mam.json", "mam.safetensors"]
    ids, mask = _batches()[1]
    bank = _bank(tmp_path, ["lora", "lora2", "mam"])  # the packs written before still run on the new graph
    got = _run_shared("onnx", tmp_path, ids, mask, torch.tensor([0, 1, 2, 0, 1]), bank)
    for r, ck in enumerate([ckpts["lora"], other, ckpts["mam"], ckpts["lora"], other]):
        assert np.abs(got[r:r + 1, :2] - _reference(ck, (ids[r:r + 1], mask[r:r + 1]))).max() <= TOL


def test_custom_op_nodes_carry_bodies_and_compact_sparse_weights(ckpts, tmp_path):
    for method, op in (("compacter", "PHMLinear"), ("sparse_adapter", "SparseLinear")):
        export_checkpoint(ckpts[method], tmp_path / method, "onnx", merged=True, log=lambda *_: None)
        m = onnx.load(str(tmp_path / method / f"{method}.onnx"))
        onnx.checker.check_model(m, full_check=True)
        assert ("hpeft", op) in {(n.domain, n.op_type) for n in m.graph.node}
        assert ("hpeft", op) in {(f.domain, f.name) for f in m.functions}
    model, _ = checkpoint.load(ckpts["sparse_adapter"])
    dense = sum(p.weight.numel() for p in model.adapters.sparse_projections())
    nnz = sum(int(p.sparse_mask.sum()) for p in model.adapters.sparse_projections())
    m = onnx.load(str(tmp_path / "sparse_adapter" / "sparse_adapter.onnx"))
    sparse_inits = [i for i in m.graph.initializer if "sparse_values" in i.name]
    assert sparse_inits and sum(np.prod(i.dims) for i in sparse_inits) == nnz < dense


@pytest.mark.parametrize("op_name", ["PHMLinear", "SparseLinear"])
def test_function_bodies_equal_the_torch_ops(op_name, tmp_path):
    from exporters.ops import FUNCTIONS, OPSET
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    if op_name == "PHMLinear":
        args = [x, torch.randn(4, 4, 4, generator=g), torch.randn(4, 4, 2, generator=g),
                torch.randn(4, 2, 3, generator=g), torch.randn(12, generator=g)]
        ref = torch.ops.hpeft.phm_linear(*args)
    else:
        w = torch.randn(6, 16, generator=g) * (torch.rand(6, 16, generator=g) > 0.4)
        idx = w.flatten().nonzero().squeeze(1)
        args = [x, w.flatten()[idx], idx, torch.tensor([6, 16]), torch.randn(6, generator=g)]
        ref = torch.ops.hpeft.sparse_linear(*args)
    names = [f"i{k}" for k in range(len(args))]
    types = {torch.float32: onnx.TensorProto.FLOAT, torch.int64: onnx.TensorProto.INT64}
    node = onnx.helper.make_node(op_name, names, ["y"], domain="hpeft")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info(n, types[a.dtype], list(a.shape))
                                                 for n, a in zip(names, args)],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(ref.shape))])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET),
                                                         onnx.helper.make_opsetid("hpeft", 1)],
                                   functions=[FUNCTIONS[op_name].to_function_proto()])
    onnx.checker.check_model(model, full_check=True)
    out = ort.InferenceSession(model.SerializeToString()).run(None, {n: a.numpy() for n, a in zip(names, args)})[0]
    assert np.abs(out - ref.numpy()).max() <= 1e-5


NO_HPEFT = r"""
import sys, json, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hpeft_serve", "exporters"):
            raise ImportError(f"{name} must not be needed")
sys.meta_path.insert(0, Block())
sys.path = [p for p in sys.path if p not in ("", ".") and not p.endswith("/main")]
import numpy as np, onnxruntime as ort, torch
d = json.loads(sys.argv[1]); data = np.load(d["npz"])
feed = {"input_ids": data["ids"], "attention_mask": data["mask"]}
a = ort.InferenceSession(d["merged"], providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
b = torch.jit.load(d["ts"])(torch.from_numpy(data["ids"]), torch.from_numpy(data["mask"])).numpy()
bank = {k[5:]: data[k] for k in data.files if k.startswith("bank_")}
c = ort.InferenceSession(d["shared"], providers=["CPUExecutionProvider"]).run(
    ["logits"], feed | {"adapter_index": data["idx"]} | bank)[0][:, :a.shape[1]]
print(json.dumps([float(np.abs(x - data["ref"]).max()) for x in (a, b, c)]))
"""


def test_exports_load_without_hpeft_code(ckpts, shared_dirs, tmp_path):
    ck = ckpts["unipelt"]
    export_checkpoint(ck, tmp_path / "m", "onnx", merged=True, log=lambda *_: None)
    export_checkpoint(ck, tmp_path / "t", "torchscript", merged=True, log=lambda *_: None)
    ids, mask = _batches()[1]
    bank = _bank(shared_dirs["onnx"], ["unipelt"])
    feed = bank_feed(bank, read_layout(shared_dirs["onnx"]))
    npz = tmp_path / "in.npz"
    np.savez(npz, ids=ids.numpy(), mask=mask.numpy(), ref=_reference(ck, (ids, mask)),
             idx=np.zeros(len(ids), np.int64), **{f"bank_{k}": v.numpy() for k, v in feed.items()})
    spec = {"npz": str(npz), "merged": str(tmp_path / "m" / "unipelt.onnx"), "ts": str(tmp_path / "t" / "unipelt.pt"),
            "shared": str(shared_dirs["onnx"] / "backbone.onnx")}
    r = subprocess.run([sys.executable, "-c", NO_HPEFT, json.dumps(spec)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert max(json.loads(r.stdout.strip().splitlines()[-1])) <= TOL


def test_export_cli_refuses_a_truncated_checkpoint(ckpts, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["lora"], bad)
    (bad / "adapter.safetensors").write_bytes((bad / "adapter.safetensors").read_bytes()[:100])
    r = subprocess.run([sys.executable, "-m", "hpeft_serve.cli", "export", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "truncated or corrupt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("method", ["compacter", "compacter_pp"])
def test_phm_folded_to_dense_is_exact(method, ckpts, tmp_path):
    export_checkpoint(ckpts[method], tmp_path, "onnx", merged=True, log=lambda *_: None, fold_phm=True)
    m = onnx.load(str(tmp_path / f"{method}.onnx"))
    assert not any(n.domain == "hpeft" for n in m.graph.node) and not m.functions
    sess = _ort(tmp_path / f"{method}.onnx")
    for ids, mask in _batches():
        got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert np.abs(got - _reference(ckpts[method], (ids, mask))).max() <= TOL
