"""What the smoothing's Muls cost, by which MatMul inputs are smoothed (bench/int8_smooth.py's groups, alpha
0.8): our int8 merged LoRA graph (random adapter, MiniLM), 1-thread CPU time of the calling thread, paired
interleaved medians (every rep runs each variant once in turn), ratios to the unsmoothed int8 graph.

    python bench/int8_smooth_cost.py [GROUP...] > result.json        # default: none all ln_o ln no_o
"""
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx, onnxruntime as ort
from export import batch_inputs, make_ckpt
from exporters.export import export_checkpoint
from exporters.merge import merge
from exporters.quantize import activation_maxima, backbone_matmuls, backbone_weights, calibration_texts, quantize_int8
from hpeft_serve import checkpoint
from hpeft_serve.backbone import load_backbone
from int8_smooth import GROUPS, kinds
bb = load_backbone("minilm"); work = Path(tempfile.mkdtemp())
ck = make_ckpt(bb, "lora", work / "ck", 0)
export_checkpoint(ck, work / "f", merged=True, log=lambda *_: None)
fp = work / "f" / "lora.onnx"
model, _ = checkpoint.load(ck); inf = merge(model); ref = backbone_weights(inf.encoder)
kind = kinds(backbone_matmuls(onnx.load(str(fp)), ref))
stats = activation_maxima(inf, bb.tokenizer(), calibration_texts(), inf.encoder.config.vocab_size)
paths = {}
for g in ["none"] + [g for g in (sys.argv[1:] or ["all", "ln_o", "ln", "no_o"]) if g != "none"]:
    p = work / f"{g}.onnx"; shutil.copy(fp, p)
    quantize_int8(p, ref, stats=None if g == "none" else stats, alpha=0.8, smooth_only=lambda n, w=GROUPS[g]: kind[n] in w)
    paths[g] = p
res = {"load_before": open("/proc/loadavg").read().split()[:3]}
for b, s, reps in ((1, 32, 400), (32, 128, 15)):
    ids, mask = batch_inputs(b, s); feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
    ss = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    for x in ss.values():
        for _ in range(3): x.run(None, feed)
    t = {k: [] for k in ss}
    for _ in range(reps):
        for k, x in ss.items():
            c = time.thread_time(); x.run(None, feed); t[k].append(1000 * (time.thread_time() - c))
    res[f"{b}x{s}"] = {k: {"ms": statistics.median(v), "vs none": statistics.median(a / n for a, n in zip(v, t["none"]))} for k, v in t.items()}
res["load_after"] = open("/proc/loadavg").read().split()[:3]
print(json.dumps(res, indent=1))
