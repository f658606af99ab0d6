"""int8 sensitivity of the backbone MatMuls of one trained checkpoint (merged ONNX): each one kept fp32 in
turn (all others int8), on a calibration set of 128 TRAINING examples (the held-out set is not used to
choose); the mean |logit error| vs fp32 each removes; then on the held-out set (as bench/quantize.py:
1,000, 64 tokens, 2 threads, interleaved by batch) fp32, int8 and the top 1, 2, 3 kept fp32.

    python bench/int8_sensitivity.py CKPT WORKDIR > bench/results/int8-sensitivity.json
"""
import sys, json, shutil, time, statistics
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np, onnx, onnxruntime as ort
from exporters.export import export_checkpoint
from exporters.merge import merge
from exporters.quantize import backbone_weights, backbone_matmuls, quantize_int8
from hpeft_serve import checkpoint
from hpeft_serve.backbone import load_backbone
from hpeft_serve.data import load_task
from quantize import batches
ck, work = Path(sys.argv[1]), Path(sys.argv[2]); work.mkdir(parents=True, exist_ok=True)
model, cfg = checkpoint.load(ck); name = cfg["name"]; task = cfg["task"]
export_checkpoint(ck, work / "fp32", merged=True, log=lambda *_: None)
fp32 = work / "fp32" / f"{name}.onnx"
ref = backbone_weights(merge(model).encoder)
nodes = backbone_matmuls(onnx.load(str(fp32)), ref)
data = load_task(task, 320, 1000)
tok = load_backbone(cfg["backbone"]["name"]).tokenizer()
calib = list(batches(tok, [t for t, _ in data.train[:128]]))
def sess(p, t=1):
    so = ort.SessionOptions(); so.intra_op_num_threads = t
    return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
def logits(s, bs): return np.concatenate([s.run(["logits"], {"input_ids": i, "attention_mask": m})[0] for i, m in bs])
def variant(keep, tag):
    p = work / f"{tag}.onnx"; shutil.copy(fp32, p); quantize_int8(p, ref, keep_fp32=tuple(keep)); return p
L32 = logits(sess(fp32), calib)
err = lambda L: float(np.abs(L - L32).mean())
base = err(logits(sess(variant([], "int8")), calib))
sens = {}
for n in nodes:
    sens[n] = base - err(logits(sess(variant([n], "loo")), calib))
    print(f"{n:40s} gain {sens[n]:.5f}", file=sys.stderr, flush=True)
order = sorted(nodes, key=lambda n: -sens[n])
calib = {"calib_examples": 128, "calib_mean_abs_err_int8": base, "gain_by_matmul": {n: sens[n] for n in order}}
# held-out: fp32, int8, keep top1/top2/top3 (2 threads, interleaved by batch, as bench/quantize.py)
test = list(batches(tok, [t for t, _ in data.test])); gold = np.array([y for _, y in data.test])
vs = {"fp32": fp32, "int8": variant([], "int8")} | {f"keep{k}": variant(order[:k], f"keep{k}") for k in (1, 2, 3)}
ss = {k: sess(p, 2) for k, p in vs.items()}
out = {k: [] for k in ss}; secs = {k: 0.0 for k in ss}
for i, m in test:
    for k, s in ss.items():
        t = time.perf_counter(); out[k].append(s.run(["logits"], {"input_ids": i, "attention_mask": m})[0]); secs[k] += time.perf_counter() - t
out = {k: np.concatenate(v) for k, v in out.items()}
res = {k: {"acc": float((v.argmax(1) == gold).mean()), "max_logit_diff": float(np.abs(v - out["fp32"]).max()),
           "argmax_agree": float((v.argmax(1) == out["fp32"].argmax(1)).mean()), "speedup_vs_fp32": secs["fp32"] / secs[k]} for k, v in out.items()}
print(json.dumps({"checkpoint": str(ck), **calib, "kept": {f"keep{k}": order[:k] for k in (1, 2, 3)}, "heldout": res,
                  "load": open("/proc/loadavg").read().split()[:3]}, indent=1))
