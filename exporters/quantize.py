"""Reduced-precision copies of an exported ONNX graph (merged or shared): `--quantize int8` and
`--precision fp16`.

int8 (CPU): onnxruntime's dynamic quantization of the frozen backbone's projections only (q, k, v, o,
FFN in and out of every layer: weights int8 per output channel, activations uint8 quantized per call);
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
                  external: bool = False, keep_fp32: tuple[str, ...] = ()) -> dict:
    """Quantize the backbone MatMuls of the graph at `path` in place (but those named in `keep_fp32`, which
    must be backbone MatMuls); returns what was done."""
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
            "residual_sums": residuals, **({"kept_fp32": list(keep_fp32)} if keep_fp32 else {})}


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
    """How an export's graph computes: "fp32" (exact), "int8" (backbone MatMuls, CPU) or "fp16" (CUDA)."""

    kind: str = "fp32"

    @classmethod
    def check(cls, quantize: str | None, precision: str, fmt: str) -> "Precision":
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
        return cls(kind)

    @classmethod
    def of(cls, info: dict) -> "Precision":
        """The precision an export json (backbone.json, <name>.json) records."""
        q = info.get("quantization") or {}
        return cls(q.get("mode") or q.get("precision") or "fp32")

    def __str__(self) -> str:
        return self.kind

    def suffix(self) -> str:
        return "" if self.kind == "fp32" else f", {self.kind}"

    def apply(self, path: Path, encoder, external: bool = False) -> dict:
        """Turn the fp32 graph at `path` into this precision; what the export json records ({} for fp32)."""
        if self.kind == "int8":
            return {"quantization": quantize_int8(path, backbone_weights(encoder), external=external)}
        if self.kind == "fp16":
            return {"quantization": to_fp16(path, external=external)}
        return {}
