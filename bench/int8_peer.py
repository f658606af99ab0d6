"""Our merged LoRA int8 graph vs onnxruntime's int8 dynamic quantization of the plain Hugging Face export of
MiniLM (bench/export.py's peer, built by its hf_peers), like for like, and what onnxruntime runs of each.

Variants: ours as exported (smoothed, residual sums as ONNX Sum, see exporters/quantize.py), ours not
smoothed (`smooth=False`: what the smoothing's Muls cost), the peer, and our fp32 merged graph (the int8
speed-up vs fp32 in the same run). (Until the smoothing, a variant with the residual Sums turned back into
Adds was measured instead: README's "residual Adds back" row.) For each: the op counts after onnxruntime's optimizer, then
paired, interleaved timing (every rep runs each variant once, in turn): 1-thread CPU time of the calling
thread (the steadier number on a shared machine) and 2-thread wall time; medians, and the median of the
per-rep ratios to the peer. /proc/loadavg before and after.

    python bench/int8_peer.py [--reps 300] [--out bench/results/int8-peer.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import batch_inputs, hf_peers, make_ckpt  # noqa: E402

from exporters.export import export_checkpoint  # noqa: E402
from hpeft_serve.backbone import load_backbone  # noqa: E402


def session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if optimized:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def paired(models: dict[str, Path], b: int, s: int, reps: int, base: str) -> dict:
    ids, mask = batch_inputs(b, s)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    out = {"load_before": open("/proc/loadavg").read().split()[:3]}
    for threads, clock, what in ((1, time.thread_time, "cpu"), (2, time.perf_counter, "wall")):
        ss = {k: session(p, threads) for k, p in models.items()}
        for sess in ss.values():
            for _ in range(3):
                sess.run(None, feed)
        t = {k: [] for k in ss}
        for _ in range(reps):
            for k, sess in ss.items():
                c = clock()
                sess.run(None, feed)
                t[k].append(1000 * (clock() - c))
        out[f"{threads} thread {what} ms"] = {k: statistics.median(v) for k, v in t.items()}
        out[f"{threads} thread {what} / {base} (median of paired ratios)"] = {
            k: statistics.median(a / p for a, p in zip(v, t[base])) for k, v in t.items()}
        if "ours fp32" in t:
            out[f"{threads} thread {what} speed-up vs ours fp32 (median of paired fp32 / variant)"] = {
                k: statistics.median(f / a for f, a in zip(t["ours fp32"], v)) for k, v in t.items()}
    out["load_after"] = open("/proc/loadavg").read().split()[:3]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=300, help="paired reps at 1 x 32 (32 x 128: reps // 30)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/int8-peer.json"))
    args = ap.parse_args()
    backbone = load_backbone("minilm")
    work = Path(tempfile.mkdtemp(prefix="hpeft-bench-int8-peer-"))
    ck = make_ckpt(backbone, "lora", work / "ckpt", 0)
    export_checkpoint(ck, work / "ours", "onnx", merged=True, quantize="int8", log=lambda *_: None)
    ours = work / "ours" / "lora.onnx"
    sums = [n for n in onnx.load(str(ours)).graph.node if n.op_type == "Sum"]
    export_checkpoint(ck, work / "plain", "onnx", merged=True, quantize="int8", smooth=False, log=lambda *_: None)
    export_checkpoint(ck, work / "fp32", "onnx", merged=True, log=lambda *_: None)
    peer = hf_peers(backbone.folder, work / "hf")["plain int8"]
    models = {"ours": ours, "ours, not smoothed": work / "plain" / "lora.onnx", "ORT HF export int8": peer,
              "ours fp32": work / "fp32" / "lora.onnx"}
    ops = {}
    for k, p in models.items():
        opt = work / f"opt-{p.stem}.onnx"
        session(p, 1, opt)
        ops[k] = dict(sorted(collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node).items()))
    res = {"residual sums in ours": len(sums), "ops after onnxruntime's optimizer": ops}
    for b, s, reps in ((1, 32, args.reps), (32, 128, max(3, args.reps // 30))):
        res[f"{b}x{s}"] = paired(models, b, s, reps, "ORT HF export int8")
        print(f"{b}x{s}: " + json.dumps(res[f"{b}x{s}"]), file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    for k in ("1x32", "32x128"):
        r = res[k]
        print(f"{k}: 1-thread CPU / peer " + ", ".join(f"{v}: {x:.3f}" for v, x in
              r["1 thread cpu / ORT HF export int8 (median of paired ratios)"].items()) +
              "; 2-thread wall / peer " + ", ".join(f"{v}: {x:.3f}" for v, x in
              r["2 thread wall / ORT HF export int8 (median of paired ratios)"].items()) +
              "; 1-thread CPU speed-up vs fp32 " + ", ".join(f"{v}: {x:.2f}x" for v, x in
              r["1 thread cpu speed-up vs ours fp32 (median of paired fp32 / variant)"].items()) +
              "; 2-thread wall speed-up vs fp32 " + ", ".join(f"{v}: {x:.2f}x" for v, x in
              r["2 thread wall speed-up vs ours fp32 (median of paired fp32 / variant)"].items()) +
              f"; load {r['load_before']} -> {r['load_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
