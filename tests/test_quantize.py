"""Quantized and half-precision exports (exporters/quantize.py), on the tiny random BERT.

int8 (`--quantize int8`) is not exact; its tolerance, stated in the README and held here: max |logit
difference| vs the fp32 PyTorch forward <= INT8_TOL (measured on this backbone: 1.6e-4 to 4e-4 for logits
of magnitude ~0.3; on MiniLM trained adapters bench/quantize.py measures it), and every row whose fp32 top
logit leads by more than 2 x INT8_TOL keeps its argmax. Only the backbone's 6 projections per layer are
quantized: adapter MatMuls (even one as wide as a backbone projection), heads, LayerNorms and the hpeft
custom ops with their function bodies stay fp32, and SharedRuntime serves the int8 shared graph unchanged.
The smoothing done by default before int8 is exact in fp32 and lowers the int8 error on outlier channels.
fp16 (`--precision fp16`, for CUDA; no GPU here, so it runs on CPU onnxruntime only): a valid graph with
fp32 inputs and outputs, within FP16_TOL.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
import pytest
import torch

from exporters.export import export_checkpoint
from hpeft_serve import checkpoint
from hpeft_serve.errors import HpeftError
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.serving.runtime import SharedRuntime
from hpeft_serve.training import build_model
from .conftest import mixed_lengths

INT8_TOL = 1e-2  # ~25x the largest difference measured on the tiny backbone; MiniLM: see bench/quantize.py
FP16_TOL = 2e-3
QUANT_OPS = ("MatMulInteger", "DynamicQuantizeMatMul")


def _ckpt(backbone, method, folder, seed=0, **overrides):
    model = build_model(backbone, resolve(method, backbone.config.num_hidden_layers, overrides), HeadConfig(3), seed)
    model.adapters.eject_prefix()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for proj in model.adapters.sparse_projections():
            proj.sparse_mask.copy_(torch.rand(proj.weight.shape, generator=g) > 0.4)
            proj.weight.mul_(proj.sparse_mask)
    return checkpoint.save(model, backbone, folder, ("a", "b", "c"), {})


def _batch(b=6, s=17, seed=3):
    ids, mask = mixed_lengths(b, s, seed, step=3)
    return ids.numpy(), mask.numpy()


def _reference(ckpt, ids, mask):
    model, _ = checkpoint.load(ckpt)
    with torch.no_grad():
        return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def _check_close(got, ref, tol):
    diff = float(np.abs(got - ref).max())
    assert diff <= tol, f"max logit difference {diff:.2e} > {tol}"
    top = np.sort(ref, axis=1)
    clear = top[:, -1] - top[:, -2] > 2 * tol
    assert (got.argmax(1) == ref.argmax(1))[clear].all()
    return diff


def _quantized(path):
    m = onnx.load(str(path), load_external_data=False)
    return m, sum(n.op_type in QUANT_OPS for n in m.graph.node)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("q8")
    d = tiny_bert.config.hidden_size
    return {"lora": _ckpt(tiny_bert, "lora", root / "lora"),
            "compacter": _ckpt(tiny_bert, "compacter", root / "compacter", seed=1),
            # a dense adapter exactly as wide as the backbone: shape alone cannot tell it from a projection
            "adapter": _ckpt(tiny_bert, "adapter", root / "adapter", seed=2, bottleneck=d)}


@pytest.mark.parametrize("method", ["lora", "compacter", "adapter"])
def test_int8_merged_within_tolerance_backbone_only(method, ckpts, tiny_bert, tmp_path):
    info = export_checkpoint(ckpts[method], tmp_path, merged=True, quantize="int8", log=lambda *_: None)
    path = tmp_path / f"{method}.onnx"
    model, n = _quantized(path)
    layers = tiny_bert.config.num_hidden_layers
    assert n == 6 * layers and info["quantization"]["matmuls"] == 6 * layers
    assert json.loads((tmp_path / f"{method}.json").read_text())["quantization"]["mode"] == "int8"
    # the hpeft ops (compacter: PHMLinear) and their function bodies are kept
    assert ({n.op_type for n in model.graph.node if n.domain == "hpeft"} == {f.name for f in model.functions})
    if method == "compacter":
        assert [f.name for f in model.functions] == ["PHMLinear"]
    ids, mask = _batch()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    diff = _check_close(got, _reference(ckpts[method], ids, mask), INT8_TOL)
    assert diff > 1e-7  # really quantized


def test_int8_shared_served_by_runtime_mixed(ckpts, tmp_path):
    for m in ("lora", "compacter"):
        export_checkpoint(ckpts[m], tmp_path, quantize="int8", log=lambda *_: None)
    info = json.loads((tmp_path / "backbone.json").read_text())
    assert info["quantization"]["mode"] == "int8"
    model, n = _quantized(tmp_path / "backbone.onnx")
    assert n == info["quantization"]["matmuls"] > 0
    # every adapter tensor is still a float graph input
    bank = {i.name: i.type.tensor_type.elem_type for i in model.graph.input if i.name in info["inputs"][3:]}
    assert bank and set(bank.values()) == {onnx.TensorProto.FLOAT}
    ids, mask = _batch()
    names = ["lora", "compacter", "lora", "compacter", "compacter", "lora"]
    answers = SharedRuntime(tmp_path).infer(ids, mask, names)
    assert answers[1] == [None] * len(names)
    refs = {m: _reference(ckpts[m], ids, mask) for m in ("lora", "compacter")}
    got = np.stack(answers[0])
    ref = np.stack([refs[n][r] for r, n in enumerate(names)])
    _check_close(got, ref, INT8_TOL)


def test_int8_shared_with_bitfit_quantizes_every_backbone_projection(tiny_bert, tmp_path):
    """BitFit's per-layer If (exporters/shared.py) would put the FFN projection inside If branches, where the
    quantizer does not look: an int8 shared graph keeps every backbone projection at top level, all int8."""
    ck = _ckpt(tiny_bert, "bitfit", tmp_path / "ck", seed=4)
    export_checkpoint(ck, tmp_path / "out", quantize="int8", log=lambda *_: None)
    info = json.loads((tmp_path / "out" / "backbone.json").read_text())
    assert info["layout"]["bitfit"]
    model, n = _quantized(tmp_path / "out" / "backbone.onnx")
    assert n == info["quantization"]["matmuls"] == 6 * tiny_bert.config.num_hidden_layers
    ids, mask = _batch()
    got = SharedRuntime(tmp_path / "out").infer(ids, mask, [ck.name] * len(ids))[0]
    _check_close(np.stack(got), _reference(ck, ids, mask), INT8_TOL)


def test_fp16_graph_valid_io_fp32(ckpts, tmp_path):
    """fp16 is for CUDA; CUDA is not run here: the graph is checked and run on CPU onnxruntime."""
    export_checkpoint(ckpts["compacter"], tmp_path / "m", merged=True, precision="fp16", log=lambda *_: None)
    export_checkpoint(ckpts["compacter"], tmp_path / "s", precision="fp16", log=lambda *_: None)
    ids, mask = _batch()
    ref = _reference(ckpts["compacter"], ids, mask)
    m = onnx.load(str(tmp_path / "m" / "compacter.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert [i.type.tensor_type.elem_type for i in m.graph.output] == [onnx.TensorProto.FLOAT]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    got = ort.InferenceSession(str(tmp_path / "m" / "compacter.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    _check_close(got, ref, FP16_TOL)
    answers = SharedRuntime(tmp_path / "s").infer(ids, mask, ["compacter"] * len(ids))
    _check_close(np.stack(answers[0]), ref, FP16_TOL)


def test_fp16_shared_mixed_prefix_and_bitfit_rows(ckpts, tiny_bert, tmp_path):
    """fp16 converts the If branches too: the prefix attention of the rows that have a prefix beside rows that
    have none, and BitFit's per-layer If, in one mixed batch (run on CPU onnxruntime)."""
    cks = {"unipelt": _ckpt(tiny_bert, "unipelt", tmp_path / "u", seed=5), "bitfit": _ckpt(tiny_bert, "bitfit",
                                                                                       tmp_path / "b", seed=6)}
    for ck in cks.values():
        export_checkpoint(ck, tmp_path / "s", precision="fp16", log=lambda *_: None)
    export_checkpoint(ckpts["lora"], tmp_path / "s", precision="fp16", log=lambda *_: None)
    cks["lora"] = ckpts["lora"]
    ids, mask = _batch()
    names = ["unipelt", "bitfit", "lora", "unipelt", "lora", "bitfit"]
    got = np.stack(SharedRuntime(tmp_path / "s").infer(ids, mask, [cks[n].name for n in names])[0])
    refs = {n: _reference(ck, ids, mask) for n, ck in cks.items()}
    _check_close(got, np.stack([refs[n][r] for r, n in enumerate(names)]), FP16_TOL)


def test_precision_refusals(ckpts, tmp_path):
    with pytest.raises(HpeftError, match="needs --format onnx"):
        export_checkpoint(ckpts["lora"], tmp_path / "ts", "torchscript", merged=True, quantize="int8")
    with pytest.raises(HpeftError, match="exclude each other"):
        export_checkpoint(ckpts["lora"], tmp_path / "x", quantize="int8", precision="fp16")
    with pytest.raises(HpeftError, match="unknown --quantize"):
        export_checkpoint(ckpts["lora"], tmp_path / "x", quantize="int4")
    export_checkpoint(ckpts["lora"], tmp_path / "s", quantize="int8", log=lambda *_: None)
    before = (tmp_path / "s" / "backbone.onnx").read_bytes()
    with pytest.raises(HpeftError, match=r"holds a int8 \(smoothed, alpha [0-9.]+\) shared graph; this export asks for fp32"):  # fp32 into an int8 folder
        export_checkpoint(ckpts["compacter"], tmp_path / "s", log=lambda *_: None)
    assert (tmp_path / "s" / "backbone.onnx").read_bytes() == before
    assert not (tmp_path / "s" / "packs" / "compacter.json").exists()


def test_deploy_refuses_other_precision_into_served_repo(ckpts, tmp_path):
    """A repository serving an fp32 shared graph is not silently kept fp32 (nor switched) by an int8 export:
    the deploy is refused, naming both precisions, and the served graph and packs are unchanged."""
    from hpeft_serve.serving.deploy import MODEL, deploy
    export_checkpoint(ckpts["lora"], tmp_path / "f32", log=lambda *_: None)
    export_checkpoint(ckpts["compacter"], tmp_path / "i8", quantize="int8", log=lambda *_: None)
    deploy(tmp_path / "f32", tmp_path / "repo", log=lambda *_: None)
    served = tmp_path / "repo" / MODEL / "1"
    before = {p.relative_to(served): p.read_bytes() for p in served.rglob("*") if p.is_file()}
    with pytest.raises(HpeftError, match="serves a fp32 graph.*is a int8 export"):
        deploy(tmp_path / "i8", tmp_path / "repo", log=lambda *_: None)
    after = {p.relative_to(served): p.read_bytes() for p in served.rglob("*") if p.is_file()}
    assert after == before


def _optimized_ops(path, tmp_path):
    """Op counts of the graph onnxruntime runs (after its CPU graph optimizations), as bench/export.py does."""
    import collections
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"opt-{path.stem}.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_int8_merged_lora_runs_the_kernels_of_plain_export_int8(ckpts, tiny_bert, tmp_path):
    """Like for like with onnxruntime's int8 dynamic quantization of a plain torch.onnx export of the same
    backbone (bench/export.py's peer): after onnxruntime's graph optimizations, the merged LoRA int8 graph
    runs every backbone projection in the same fused int8 kernels (DynamicQuantizeMatMul, and
    MatMulIntegerToFloat for q, k, v sharing one DynamicQuantizeLinear), none left as an unfused
    MatMulInteger, and its attention as many fp32 MatMuls as the peer's (no extra op in the hot loop); its
    LayerNorms unfused (the residual sums are Sums), where the peer's FFN one is a SkipLayerNormalization."""
    import warnings
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import BertConfig, BertModel
    c = tiny_bert.config

    class Plain(torch.nn.Module):  # a transformers BERT of the tiny backbone's size (its weights do not matter)
        def __init__(self):
            super().__init__()
            self.hf = BertModel(BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                           num_hidden_layers=c.num_hidden_layers,
                                           num_attention_heads=c.num_attention_heads,
                                           intermediate_size=c.intermediate_size,
                                           attn_implementation="eager")).eval()

        def forward(self, input_ids, attention_mask):
            return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    ids, mask = _batch()
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Plain(), (torch.from_numpy(ids), torch.from_numpy(mask)), str(tmp_path / "hf.onnx"),
                          dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"],
                          dynamic_axes=axes, do_constant_folding=True)
    quantize_dynamic(tmp_path / "hf.onnx", tmp_path / "hf8.onnx", weight_type=QuantType.QInt8)
    export_checkpoint(ckpts["lora"], tmp_path, merged=True, quantize="int8", log=lambda *_: None)
    ours, peer = _optimized_ops(tmp_path / "lora.onnx", tmp_path), _optimized_ops(tmp_path / "hf8.onnx", tmp_path)
    layers = tiny_bert.config.num_hidden_layers
    for op in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLinear"):
        assert ours[op] == peer[op] > 0, (op, ours[op], peer[op])
    assert ours["DynamicQuantizeMatMul"] + ours["MatMulIntegerToFloat"] == 6 * layers
    assert ours["MatMulInteger"] == 0
    assert ours["MatMul"] + ours["FusedMatMul"] == peer["MatMul"] + peer["FusedMatMul"] == 2 * layers
    # the residual sums are ONNX Sums, which onnxruntime does not fuse into its (slower on CPU)
    # SkipLayerNormalization: every LayerNorm runs as LayerNormalization; the peer fuses the FFN's
    assert ours["SkipLayerNormalization"] == 0 and ours["LayerNormalization"] == 2 * layers + 1, ours
    assert ours["Sum"] == 2 * layers + 1 and peer["SkipLayerNormalization"] == layers, (ours, peer)


def _all_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _all_nodes(g)


def test_int8_residual_sums_are_exact(ckpts, tmp_path):
    """Writing the residual Adds as Sums changes no number: with onnxruntime's graph optimizations off
    (no fusion either way), the merged int8 graph gives bit-identical logits with its Sums turned back into
    Adds; in the merged and the shared graph only two-input Adds read by LayerNorms alone were rewritten."""
    ids, mask = _batch()
    for merged in (True, False):
        out = tmp_path / ("m" if merged else "s")
        export_checkpoint(ckpts["lora"], out, merged=merged, quantize="int8", log=lambda *_: None)
        path = out / ("lora.onnx" if merged else "backbone.onnx")
        info = json.loads((out / ("lora.json" if merged else "backbone.json")).read_text())
        m = onnx.load(str(path))
        nodes = list(_all_nodes(m.graph))
        sums = [n for n in nodes if n.op_type == "Sum"]
        assert len(sums) == info["quantization"]["residual_sums"] > 0
        readers = {}
        for n in nodes:
            for i in n.input:
                readers.setdefault(i, []).append(n.op_type)
        assert all(set(readers[n.output[0]]) == {"LayerNormalization"} and len(n.input) == 2 for n in sums)
        for n in sums:
            n.op_type = "Add"
        if not merged:
            continue
        back = tmp_path / "back.onnx"
        onnx.save(m, str(back))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        feed = {"input_ids": ids, "attention_mask": mask}
        a, b = (ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
                for p in (path, back))
        assert np.array_equal(a, b)


def test_int8_keep_fp32_named_matmul(ckpts, tiny_bert, tmp_path):
    """keep_fp32 leaves exactly the named backbone MatMul fp32 (its weight untouched, every other projection
    int8, still within tolerance); a name that is no backbone MatMul is refused by name."""
    from exporters.merge import merge
    from exporters.quantize import backbone_matmuls, backbone_weights, quantize_int8
    export_checkpoint(ckpts["lora"], tmp_path, merged=True, log=lambda *_: None)
    path = tmp_path / "lora.onnx"
    model, _ = checkpoint.load(ckpts["lora"])
    ref = backbone_weights(merge(model).encoder)
    names = backbone_matmuls(onnx.load(str(path)), ref)
    keep = names[-1]
    with pytest.raises(RuntimeError, match="keep_fp32 names no backbone MatMul: /not/a/node"):
        quantize_int8(path, ref, keep_fp32=("/not/a/node",))
    info = quantize_int8(path, ref, keep_fp32=(keep,))
    layers = tiny_bert.config.num_hidden_layers
    q, n = _quantized(path)
    assert n == info["matmuls"] == 6 * layers - 1 and info["kept_fp32"] == [keep]
    inits = {i.name for i in q.graph.initializer}
    fp32_weighted = [x.name for x in q.graph.node if x.op_type == "MatMul" and x.input[1] in inits]
    # besides it only the head's (fp32 by design); the attention products have no constant weight
    assert keep in fp32_weighted and all(x.startswith("/head/") for x in fp32_weighted if x != keep), fp32_weighted
    ids, mask = _batch()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    _check_close(got, _reference(ckpts["lora"], ids, mask), INT8_TOL)


def _outlier_model(ckpt):
    """The merged tiny model with a few outlier channels in every LayerNorm output (as trained transformers
    have): gamma of channels 0-2 x 100, so each projection reading them sees a far larger input there."""
    from exporters.merge import merge
    model, _ = checkpoint.load(ckpt)
    m = merge(model)
    with torch.no_grad():
        for name, p in m.encoder.named_parameters():
            if "LayerNorm" in name and name.endswith("weight"):
                p[:3] *= 100
    return m


def test_smoothing_is_exact_in_fp32(ckpts, tiny_bert, tmp_path):
    """The smoothed fp32 graph (a Mul by 1/s before each smoothed MatMul input, diag(s) folded into the
    weights, no quantization) gives the unsmoothed graph's logits within 1e-5 on a padded mixed-length
    batch, with s far from 1; every backbone MatMul input is smoothed, one Mul per distinct input."""
    from exporters.onnx_export import export_merged_onnx
    from exporters.quantize import activation_maxima, backbone_matmuls, backbone_weights, calibration_texts, smooth
    m = _outlier_model(ckpts["compacter"])
    path = export_merged_onnx(m, tmp_path / "f.onnx")
    stats = activation_maxima(m, tiny_bert.tokenizer(), calibration_texts(8), m.encoder.config.vocab_size)
    g = onnx.load(str(path))
    nodes = backbone_matmuls(g, backbone_weights(m.encoder))
    layers = tiny_bert.config.num_hidden_layers
    assert smooth(g, nodes, stats, 0.8) == 4 * layers  # q/k/v share one input; o, FFN in, FFN out
    inv = [numpy_helper.to_array(i) for i in g.graph.initializer if i.name.endswith("__smooth_inv")]
    assert len(inv) == 4 * layers and max(float(np.abs(np.log(v)).max()) for v in inv) > 1.0
    onnx.save(g, str(tmp_path / "s.onnx"))
    ids, mask = _batch()
    feed = {"input_ids": ids, "attention_mask": mask}
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
            for p in (path, tmp_path / "s.onnx"))
    with torch.no_grad():
        ref = m(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.abs(a - ref).max() <= 1e-5 and np.abs(b - a).max() <= 1e-5, (np.abs(a - ref).max(), np.abs(b - a).max())


def test_smoothing_lowers_int8_error_on_outliers(ckpts, tiny_bert, tmp_path):
    """With outlier input channels, int8 after smoothing is closer to the fp32 PyTorch forward than int8
    without (mean |logit error| at most 0.6x; measured 0.44x), and quantize_int8 records what it smoothed."""
    import shutil
    from exporters.onnx_export import export_merged_onnx
    from exporters.quantize import SMOOTH_ALPHA, activation_maxima, backbone_weights, calibration_texts, quantize_int8
    m = _outlier_model(ckpts["lora"])
    path = export_merged_onnx(m, tmp_path / "f.onnx")
    shutil.copy(path, tmp_path / "s.onnx")
    ref_w = backbone_weights(m.encoder)
    stats = activation_maxima(m, tiny_bert.tokenizer(), calibration_texts(8), m.encoder.config.vocab_size)
    plain = quantize_int8(path, ref_w)
    smoothed = quantize_int8(tmp_path / "s.onnx", ref_w, stats=stats)
    assert "smoothing" not in plain
    layers = tiny_bert.config.num_hidden_layers
    assert smoothed["smoothing"]["inputs"] == 4 * layers and smoothed["smoothing"]["alpha"] == SMOOTH_ALPHA
    ids, mask = mixed_lengths(16, 24, 5, step=2)
    ids, mask = ids.numpy(), mask.numpy()
    with torch.no_grad():
        ref = m(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    err = {}
    for p in (path, tmp_path / "s.onnx"):
        got = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
            ["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        err[p.name] = float(np.abs(got - ref).mean())
    assert err["s.onnx"] <= 0.6 * err["f.onnx"], err


def test_int8_export_smoothed_by_default_recorded(ckpts, tmp_path):
    """`--quantize int8` smooths by default (the export json says so, calibrated on the model for a merged
    export, the plain backbone for a shared one); smooth=False does not; the two shared graphs are told
    apart: one is not reused for the other (refused, naming both), and Precision.of reads each back (an int8
    json without "smoothing", from before it, reads as not smoothed)."""
    from exporters.quantize import SMOOTH_ALPHA, Precision
    info = export_checkpoint(ckpts["lora"], tmp_path / "m", merged=True, quantize="int8", log=lambda *_: None)
    q = info["quantization"]
    assert q["smoothing"]["alpha"] == SMOOTH_ALPHA and "adapters included" in q["smoothing"]["calibrated_on"]
    off = export_checkpoint(ckpts["lora"], tmp_path / "o", merged=True, quantize="int8", smooth=False,
                            log=lambda *_: None)
    assert "smoothing" not in off["quantization"]
    assert Precision.of(json.loads((tmp_path / "o" / "lora.json").read_text())) == Precision("int8")
    export_checkpoint(ckpts["lora"], tmp_path / "s", quantize="int8", log=lambda *_: None)
    shared = json.loads((tmp_path / "s" / "backbone.json").read_text())
    assert "plain backbone" in shared["quantization"]["smoothing"]["calibrated_on"]
    assert Precision.of(shared) == Precision("int8", SMOOTH_ALPHA)
    with pytest.raises(HpeftError, match=r"holds a int8 \(smoothed.*asks for int8 \(not smoothed\)"):
        export_checkpoint(ckpts["compacter"], tmp_path / "s", quantize="int8", smooth=False, log=lambda *_: None)
