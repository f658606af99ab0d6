"""Reduced-precision copies of an exported ONNX graph (merged or shared): `--quantize int8` and
`--precision fp16`.

int8 (CPU): onnxruntime's dynamic quantization of the frozen backbone's projections only (q, k, v, o,
FFN in and out of every layer: weights int8 per output channel, activations uint8 quantized per call),
by default after SmoothQuant-style smoothing of their inputs (`smooth`: a Mul by 1/s on each input, diag(s)
folded into the weights, exact in fp32; s from activation maxima calibrated on fixed training sentences of
the built-in tasks, `calibration_texts`);
everything else stays fp32: embeddings, LayerNorms, softmax, the head, and every adapter tensor (in the
shared graph they are graph inputs, never constants, so they cannot be quantized; in a merged graph an
adapter's own MatMuls are left alone, and only a LoRA folded into a backbone projection is quantized with
it, being part of that one weight). A MatMul is the backbone's when its constant weight equals (within
MAX_DELTA, relative) one of the exported encoder's own projection weights (for a merged export: the folded
ones): an adapter's weight never does, whatever its width. Custom-op nodes (hpeft::PHMLinear,
hpeft::SparseLinear) and their ONNX function bodies are not touched.

fp16 (CUDA): every float tensor fp16 but the graph's inputs and outputs (kept fp32, so the runtime and
clients are unchanged); the hpeft custom ops are inlined first (their bodies become plain ONNX ops, which
then run fp16 as well: no compiled hpeft kernel exists for CUDA to be displaced).

What was done is returned as a dict that the export records in its json ("quantization").
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
from onnx import numpy_helper

from .ops import DOMAIN, attach_functions

MAX_DELTA = 1e-6  # ||W - W_encoder|| / ||W_encoder||: the same tensor, up to the exporter's transpose
MODES = ("int8",)
PRECISIONS = ("fp32", "fp16")
# kept fp32 in an fp16 graph (onnxruntime's fp16 LayerNormalization accumulates in fp32 itself)
FP16_KEEP: list[str] = []


def backbone_weights(encoder) -> dict[tuple, list[np.ndarray]]:
    """The encoder's projection weights as a MatMul's constant operand (in, out), by shape (the encoder
    that was exported: a merged model's holds the folded LoRA weights)."""
    by_shape: dict[tuple, list[np.ndarray]] = {}
    for name, p in encoder.named_parameters():
        if p.dim() == 2 and "embeddings" not in name:
            w = p.detach().numpy().T
            by_shape.setdefault(w.shape, []).append(w)
    return by_shape


def _is_backbone(w: np.ndarray, reference: dict[tuple, list[np.ndarray]]) -> bool:
    for ref in reference.get(w.shape, ()):
        if np.linalg.norm(w - ref) <= MAX_DELTA * np.linalg.norm(ref):
            return True
    return False


def backbone_matmuls(model: onnx.ModelProto, reference: dict[tuple, list[np.ndarray]]) -> list[str]:
    """Names of the graph's MatMul nodes whose constant weight is a backbone projection."""
    inits = {i.name: i for i in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim == 2 and _is_backbone(w, reference):
            names.append(node.name)
    return names


CALIBRATION_PER_TASK = 64  # the first training examples of each built-in task (data.TASKS), never held-out ones
CALIBRATION_MAX_LENGTH = 128
SMOOTH_ALPHA = 0.8  # chosen on training examples: bench/int8_smooth.py, bench/results/int8-smooth.json


@lru_cache(maxsize=1)
def _calibration_texts(per_task: int) -> tuple[str, ...]:
    from hpeft_serve.data import TASKS, load_task
    return tuple(t for task in TASKS for t, _ in load_task(task).train[:per_task])


def calibration_texts(per_task: int = CALIBRATION_PER_TASK) -> list[str]:
    """A fixed set of real sentences, read offline: the first `per_task` training examples of each built-in
    task (hpeft_serve.data; the held-out sets are never read)."""
    return list(_calibration_texts(per_task))


def activation_maxima(forward, tokenizer, texts: list[str], vocab_size: int,
                      max_length: int = CALIBRATION_MAX_LENGTH, batch: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """max |x_j| over the calibration tokens (padding included: the int8 graph quantizes those too) of the
    input of every 2-D projection `forward(input_ids, attention_mask)` applies (torch.nn.functional.linear,
    which nn.Linear and the encoder's hooks call): a list of (weight as a MatMul's (in, out) operand, amax
    per input channel)."""
    import torch
    import torch.nn.functional as F
    seen: dict[int, tuple] = {}
    linear = F.linear

    def recording(x, weight, bias=None):
        if weight.dim() == 2:
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
            k = id(weight)
            seen[k] = (weight, m if k not in seen else torch.maximum(seen[k][1], m))
        return linear(x, weight, bias)

    F.linear = recording
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                enc = tokenizer(texts[i:i + batch], truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt")
                ids = enc["input_ids"] % vocab_size  # a tiny test backbone reads MiniLM's tokenizer
                forward(ids, enc["attention_mask"])
    finally:
        F.linear = linear
    return [(w.detach().numpy().T.copy(), m.numpy().astype(np.float64)) for w, m in seen.values()]


def _amax_for(w: np.ndarray, stats: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray | None:
    for ref, m in stats:
        if ref.shape == w.shape and np.linalg.norm(w - ref) <= MAX_DELTA * np.linalg.norm(ref):
            return m
    return None


def smooth(model: onnx.ModelProto, nodes: list[str], stats: list[tuple[np.ndarray, np.ndarray]],
           alpha: float = SMOOTH_ALPHA) -> int:
    """SmoothQuant's per-channel migration on the MatMuls `nodes`: y = (x * (1/s)) @ (diag(s) W) with
    s_j = max|x_j|^alpha / max|W_j.|^(1 - alpha) (MatMuls reading the same x share one s and one Mul):
    the same product in exact arithmetic, with x's outlier channels moved into the weight (int8 per output
    channel) before x is quantized per call (uint8 per tensor). `stats`: activation_maxima. Returns how many
    inputs were smoothed."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    by_name = {n.name: n for n in g.node}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for name in nodes:
        groups.setdefault(by_name[name].input[0], []).append(by_name[name])
    done = 0
    for x, members in groups.items():
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in members]
        ms = [_amax_for(w, stats) for w in ws]
        if any(m is None for m in ms):
            missing = [n.name for n, m in zip(members, ms) if m is None]
            raise RuntimeError(f"smoothing: no calibration statistics for {', '.join(missing)}")
        a = np.max(ms, axis=0)
        wmax = np.max([np.abs(w).max(1) for w in ws], axis=0).astype(np.float64)
        s = np.ones_like(a)
        ok = (a > 0) & (wmax > 0)
        s[ok] = a[ok] ** alpha / wmax[ok] ** (1 - alpha)
        s = np.clip(s, 1e-4, 1e4)
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{x}__smooth_inv")
        g.initializer.append(inv)
        mul = onnx.helper.make_node("Mul", [x, inv.name], [f"{x}__smoothed"], name=f"{x}__smooth")
        for n, w in zip(members, ws):
            scaled = numpy_helper.from_array((w * s[:, None]).astype(np.float32), n.input[1]
                                             if readers.get(n.input[1]) == 1 else f"{n.input[1]}__smooth_{n.name}")
            if scaled.name == n.input[1]:
                inits[n.input[1]].CopyFrom(scaled)
            else:
                g.initializer.append(scaled)
                n.input[1] = scaled.name
            n.input[0] = mul.output[0]
        g.node.append(mul)
        done += 1
    _topological(g)
    return done


def _load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def _save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Save over `path` (and path.data when external): the files the exports already name."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                  size_threshold=1024)
    else:
        onnx.save(model, str(path))


def _same_functions(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """The hpeft ops and their bodies come through unchanged (re-attached should a tool drop them)."""
    want = {(f.domain, f.name): f.SerializeToString() for f in before.functions}
    attach_functions(after)
    got = {(f.domain, f.name): f.SerializeToString() for f in after.functions}
    ops = lambda m: sorted(n.op_type for n in m.graph.node if n.domain == DOMAIN)  # noqa: E731
    if got != want or ops(before) != ops(after):
        raise RuntimeError("quantization changed the hpeft custom ops or their function bodies")


@contextmanager
def _quiet_root():
    """onnxruntime.quantization warns on the root logger to run its pre-processing (measured: no faster here)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(path: Path, reference: dict[tuple, list[np.ndarray]], per_channel: bool = True,
                  external: bool = False, keep_fp32: tuple[str, ...] = (),
                  stats: list[tuple[np.ndarray, np.ndarray]] | None = None, alpha: float = SMOOTH_ALPHA,
                  smooth_only=None) -> dict:
    """Quantize the backbone MatMuls of the graph at `path` in place (but those named in `keep_fp32`, which
    must be backbone MatMuls); with `stats` (activation_maxima), smooth their inputs first (all, or those
    MatMuls for which `smooth_only(name)` is true); returns what was done."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    path = Path(path)
    model = _load(path)
    nodes = backbone_matmuls(model, reference)
    keep = set(keep_fp32)
    unknown = sorted(keep - set(nodes))
    if unknown:
        raise RuntimeError(f"{path.name}: keep_fp32 names no backbone MatMul: {', '.join(unknown)}")
    nodes = [n for n in nodes if n not in keep]
    if not nodes:
        raise RuntimeError(f"{path.name}: no backbone MatMul found to quantize")
    smoothed = 0
    if stats is not None:
        smoothed = smooth(model, [n for n in nodes if smooth_only is None or smooth_only(n)], stats, alpha)
    with tempfile.TemporaryDirectory() as tmp, _quiet_root():
        out = Path(tmp) / "q.onnx"
        # reduce_range off: the u8s8 saturation it avoids needs a CPU without VNNI; MatMulConstBOnly keeps
        # activation x activation products (attention scores and mix) fp32
        quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                         per_channel=per_channel, reduce_range=False, weight_type=QuantType.QInt8,
                         use_external_data_format=external, extra_options={"MatMulConstBOnly": True})
        q = _load(out)
    _topological(q.graph)  # the quantizer's node order ignores the outer names that If branches read
    residuals = _unfused_residuals(q.graph)
    _same_functions(model, q)
    if [i.name for i in q.graph.input] != [i.name for i in model.graph.input] or \
            [o.name for o in q.graph.output] != [o.name for o in model.graph.output]:
        raise RuntimeError("quantization changed the graph's inputs or outputs")
    onnx.checker.check_model(q, full_check=True)
    _save(q, path, external)
    return {"mode": "int8", "method": "onnxruntime dynamic (weights int8 symmetric, activations uint8 per call)",
            "per_channel": per_channel, "reduce_range": False, "quantized": "backbone projection MatMuls",
            "matmuls": len(nodes), "fp32": "embeddings, LayerNorms, attention scores, adapters, heads",
            "residual_sums": residuals, **({"kept_fp32": list(keep_fp32)} if keep_fp32 else {}),
            **({"smoothing": {"method": "SmoothQuant per-channel migration, y = (x / s) @ (diag(s) W)",
                              "alpha": alpha, "inputs": smoothed}} if stats is not None else {})}


def _unfused_residuals(graph: onnx.GraphProto) -> int:
    """Write each Add whose only reader is a LayerNormalization (the residual sums, and the embeddings'
    last sum) as the ONNX Sum of the same two tensors: the same elementwise float addition, which
    onnxruntime's SkipLayerNormFusion (Add + LayerNormalization -> com.microsoft SkipLayerNormalization)
    does not match. Its CPU SkipLayerNormalization kernel is ~5x slower than Add + LayerNormalization
    (onnxruntime 1.32, measured: 57 vs 12 us at 1 x 32 x 384, 6.9 vs 1.4 ms at 32 x 128 x 384, 1 thread),
    and in the int8 graph those LayerNorms are a large share of what the int8 MatMuls left. If branches
    are rewritten too. Returns how many were rewritten."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in _reads(n):
            readers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}
    count = 0
    for n in graph.node:
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                count += _unfused_residuals(g)
        if n.op_type == "Add" and n.domain in ("", "ai.onnx") and n.output[0] not in outputs:
            users = readers.get(n.output[0], [])
            if users and all(u.op_type == "LayerNormalization" and u.domain in ("", "ai.onnx") for u in users):
                n.op_type = "Sum"
                count += 1
    return count


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used = set()
    for n in graph.node:
        used.update(_reads(n))
        local.update(n.output)
    return used - local


def _reads(node: onnx.NodeProto) -> set[str]:
    """A node's inputs, and the outer names its subgraphs (If, Loop, Scan bodies) read."""
    names = set(node.input)
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            names |= _outer_names(g)
    return names


def _topological(graph: onnx.GraphProto) -> None:
    """Reorder `graph`'s nodes so that each comes after the producers of what it reads, its subgraphs'
    outer-scope names included (stable: an ordered graph stays as it is)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, order = [(n, _reads(n)) for n in graph.node], []
    while pending:
        rest = []
        for n, reads in pending:
            if reads <= ready:
                order.append(n)
                ready.update(n.output)
            else:
                rest.append((n, reads))
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a dangling input at {rest[0][0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(order)


def to_fp16(path: Path, external: bool = False) -> dict:
    """Convert the graph at `path` to fp16 in place (inputs and outputs stay fp32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    path = Path(path)
    model = onnx.inliner.inline_local_functions(_load(path))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP, disable_shape_infer=True)
    _topological(half.graph)  # the converter appends casts of fp16 initializers after the nodes that read them
    onnx.checker.check_model(half, full_check=False)
    _save(half, path, external)
    return {"precision": "fp16", "kept_fp32": ["graph inputs and outputs", *FP16_KEEP], "target": "CUDA",
            "hpeft_ops": "inlined"}


@dataclass(frozen=True)
class Precision:
    """How an export's graph computes: "fp32" (exact), "int8" (backbone MatMuls, CPU) or "fp16" (CUDA);
    for int8, `smooth`: the SmoothQuant alpha of the smoothing before quantization (None: not smoothed)."""

    kind: str = "fp32"
    smooth: float | None = None

    @classmethod
    def check(cls, quantize: str | None, precision: str, fmt: str, smooth: bool = True) -> "Precision":
        from hpeft_serve.errors import HpeftError
        if quantize is not None and quantize not in MODES:
            raise HpeftError(f"unknown --quantize {quantize!r}: use {', '.join(MODES)}")
        if precision not in PRECISIONS:
            raise HpeftError(f"unknown --precision {precision!r}: use {', '.join(PRECISIONS)}")
        if quantize and precision != "fp32":
            raise HpeftError(f"--quantize {quantize} (CPU) and --precision {precision} (CUDA) exclude each other")
        kind = quantize or precision
        if kind != "fp32" and fmt != "onnx":
            raise HpeftError(f"--quantize/--precision {kind} needs --format onnx (TorchScript exports are fp32)")
        return cls(kind, SMOOTH_ALPHA if kind == "int8" and smooth else None)

    @classmethod
    def of(cls, info: dict) -> "Precision":
        """The precision an export json (backbone.json, <name>.json) records (an int8 export that records
        no smoothing predates it: not smoothed)."""
        q = info.get("quantization") or {}
        kind = q.get("mode") or q.get("precision") or "fp32"
        return cls(kind, (q.get("smoothing") or {}).get("alpha") if kind == "int8" else None)

    def __str__(self) -> str:
        if self.kind != "int8":
            return self.kind
        return f"int8 (smoothed, alpha {self.smooth})" if self.smooth is not None else "int8 (not smoothed)"

    def suffix(self) -> str:
        return "" if self.kind == "fp32" else f", {self}"

    def apply(self, path: Path, encoder, external: bool = False, forward=None, backbone: str | None = None) -> dict:
        """Turn the fp32 graph at `path` into this precision; what the export json records ({} for fp32).
        int8 smoothing calibrates with `forward(input_ids, attention_mask)` (a merged export: its model,
        adapters included; default: `encoder`, the plain backbone a shared graph serves every adapter on)
        on calibration_texts() tokenized by `backbone`'s tokenizer."""
        if self.kind == "int8":
            stats, note = None, {}
            if self.smooth is not None:
                stats, note = calibrate(forward or encoder, backbone, encoder.config.vocab_size)
                note["calibrated_on"] = "the exported model (adapters included)" if forward is not None \
                    else "the plain backbone (the shared graph serves every adapter)"
            q = quantize_int8(path, backbone_weights(encoder), external=external, stats=stats,
                              alpha=self.smooth if self.smooth is not None else SMOOTH_ALPHA)
            if stats is not None:
                q["smoothing"] |= note
            return {"quantization": q}
        if self.kind == "fp16":
            return {"quantization": to_fp16(path, external=external)}
        return {}


def calibrate(forward, backbone: str | None, vocab_size: int) -> tuple[list, dict]:
    """activation_maxima of `forward` on calibration_texts(), and what the export json records of it."""
    from hpeft_serve.backbone import load_backbone
    from hpeft_serve.errors import DataError, HpeftError
    if backbone is None:
        raise HpeftError("int8 smoothing needs the backbone's name (its tokenizer) to calibrate")
    try:
        texts = calibration_texts()
    except DataError as e:
        raise HpeftError(f"int8 smoothing: its calibration sentences cannot be read ({e}); export with "
                         f"smoothing off (hpeft export --quantize int8 --no-smooth)") from e
    stats = activation_maxima(forward, load_backbone(backbone).tokenizer(), texts, vocab_size)
    return stats, {"calibration": f"{len(texts)} sentences: the first {CALIBRATION_PER_TASK} training examples of "
                                  f"each built-in task, up to {CALIBRATION_MAX_LENGTH} tokens"}
