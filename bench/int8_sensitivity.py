"""int8 sensitivity of the backbone MatMuls of one trained checkpoint (merged ONNX): each kept fp32 in turn
(all others int8), scored on a calibration set of 128 TRAINING examples (the held-out set is never used to
choose) by how much of the int8 mean |logit error| vs fp32 it removes; then, on the held-out set as
bench/quantize.py measures it (1,000, 64 tokens, 2 threads, variants interleaved by batch): fp32, int8 and
int8 with the top 1, 2 and 3 kept fp32 (`quantize_int8(..., keep_fp32=...)`). All variants here are not
smoothed (quantize_int8 without stats): the analysis that preceded the smoothing (bench/int8_smooth.py).

    python bench/int8_sensitivity.py CKPT WORKDIR > result.json      # per-MatMul scores on stderr
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from exporters.export import export_checkpoint
from exporters.merge import merge
from exporters.quantize import backbone_matmuls, backbone_weights, quantize_int8
from hpeft_serve import checkpoint
from hpeft_serve.backbone import load_backbone
from hpeft_serve.data import load_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import batches  # noqa: E402

CALIBRATION = 128  # training examples
TOP = (1, 2, 3)


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def logits(sess: ort.InferenceSession, feed: list) -> np.ndarray:
    return np.concatenate([sess.run(["logits"], {"input_ids": i, "attention_mask": m})[0] for i, m in feed])


def main() -> int:
    ck, work = Path(sys.argv[1]), Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    model, cfg = checkpoint.load(ck)
    export_checkpoint(ck, work / "fp32", merged=True, log=lambda *_: None)
    fp32 = work / "fp32" / f"{cfg['name']}.onnx"
    ref = backbone_weights(merge(model).encoder)
    nodes = backbone_matmuls(onnx.load(str(fp32)), ref)

    def variant(keep: list[str], tag: str) -> Path:
        p = work / f"{tag}.onnx"
        shutil.copy(fp32, p)
        quantize_int8(p, ref, keep_fp32=tuple(keep))
        return p

    data = load_task(cfg["task"], None, 1000)
    tok = load_backbone(cfg["backbone"]["name"]).tokenizer()
    calib = list(batches(tok, [t for t, _ in data.train[:CALIBRATION]]))
    ref_logits = logits(session(fp32), calib)
    err = lambda p: float(np.abs(logits(session(p), calib) - ref_logits).mean())  # noqa: E731
    base = err(variant([], "int8"))
    gain = {}
    for n in nodes:
        gain[n] = base - err(variant([n], "one-kept"))
        print(f"{n:40s} removes {gain[n]:.5f} of {base:.5f}", file=sys.stderr, flush=True)
    order = sorted(nodes, key=lambda n: -gain[n])

    test = list(batches(tok, [t for t, _ in data.test]))
    gold = np.array([y for _, y in data.test])
    paths = {"fp32": fp32, "int8": variant([], "int8")} | {f"keep{k}": variant(order[:k], f"keep{k}") for k in TOP}
    sess = {k: session(p, 2) for k, p in paths.items()}
    out, secs = {k: [] for k in sess}, dict.fromkeys(sess, 0.0)
    for ids, mask in test:
        for k, s in sess.items():
            t = time.perf_counter()
            out[k].append(s.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0])
            secs[k] += time.perf_counter() - t
    out = {k: np.concatenate(v) for k, v in out.items()}
    held = {k: {"acc": float((v.argmax(1) == gold).mean()),
                "max_logit_diff": float(np.abs(v - out["fp32"]).max()),
                "argmax_agree": float((v.argmax(1) == out["fp32"].argmax(1)).mean()),
                "speedup_vs_fp32": secs["fp32"] / secs[k]} for k, v in out.items()}
    print(json.dumps({"checkpoint": str(ck), "calib_examples": CALIBRATION, "calib_mean_abs_err_int8": base,
                      "gain_by_matmul": {n: gain[n] for n in order}, "kept": {f"keep{k}": order[:k] for k in TOP},
                      "heldout": held, "load": open("/proc/loadavg").read().split()[:3]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
