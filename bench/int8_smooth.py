"""SmoothQuant-style smoothing before the int8 quantization (exporters/quantize.py: smooth), variants
compared on one trained checkpoint's merged ONNX graph: which MatMul inputs are smoothed (all 36 backbone
MatMuls, by kind: the LayerNorm-fed q/k/v and FFN-in, the attention output, the FFN output that reads GELU)
and alpha. Calibration: the fixed sentences of exporters.quantize.calibration_texts (training examples of
the built-in tasks). Each variant is scored on a TUNING set of training examples the checkpoint was not
trained on (its config's train_size onwards, up to --tune examples): settings are chosen there; and on
the held-out set (1,000, 64 tokens) as bench/quantize.py measures it, for the report only.

    python bench/int8_smooth.py CKPT... [--variants all:0.5 ffn_out:0.5 ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from exporters.export import export_checkpoint
from exporters.merge import merge
from exporters.quantize import activation_maxima, backbone_matmuls, backbone_weights, calibration_texts, quantize_int8
from hpeft_serve import checkpoint
from hpeft_serve.backbone import load_backbone
from hpeft_serve.data import load_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import batches  # noqa: E402

KINDS = ("q", "k", "v", "o", "ffn_in", "ffn_out")
GROUPS = {"all": set(KINDS), "ln": {"q", "k", "v", "ffn_in"}, "qkv": {"q", "k", "v"}, "ffn_in": {"ffn_in"},
          "o": {"o"}, "ln_o": {"q", "k", "v", "ffn_in", "o"}, "no_o": {"q", "k", "v", "ffn_in", "ffn_out"}, "ffn_out": {"ffn_out"}, "ffn": {"ffn_in", "ffn_out"}, "none": set()}


def kinds(nodes: list[str]) -> dict[str, str]:
    """The backbone MatMuls in graph order are q, k, v, o, FFN in, FFN out of each layer."""
    if len(nodes) % 6:
        raise RuntimeError(f"{len(nodes)} backbone MatMuls: not 6 per layer")
    return {n: KINDS[i % 6] for i, n in enumerate(nodes)}


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def score(sess, feed, gold, ref=None):
    out = np.concatenate([sess.run(["logits"], {"input_ids": i, "attention_mask": m})[0] for i, m in feed])
    r = {"acc": float((out.argmax(1) == gold).mean())}
    if ref is not None:
        r |= {"mean_abs_err": float(np.abs(out - ref).mean()), "max_abs_err": float(np.abs(out - ref).max()),
              "argmax_agree": float((out.argmax(1) == ref.argmax(1)).mean())}
    return out, r


def run(ck: Path, work: Path, variants: list[str], tune: int) -> dict:
    model, cfg = checkpoint.load(ck)
    name, task = cfg["name"], cfg["task"]
    export_checkpoint(ck, work / "fp32", merged=True, log=lambda *_: None)
    fp32 = work / "fp32" / f"{name}.onnx"
    inference = merge(model)
    ref = backbone_weights(inference.encoder)
    kind = kinds(backbone_matmuls(onnx.load(str(fp32)), ref))
    tok = load_backbone(cfg["backbone"]["name"]).tokenizer()
    stats = activation_maxima(inference, tok, calibration_texts(), inference.encoder.config.vocab_size)
    data = load_task(task, None, 1000)
    start = cfg["train"]["train_size"]
    sets = {"tune": data.train[start:start + tune], "heldout": data.test}
    feeds = {k: (list(batches(tok, [t for t, _ in v])), np.array([y for _, y in v])) for k, v in sets.items()}
    base = {k: score(session(fp32), f, g) for k, (f, g) in feeds.items()}
    row = {"checkpoint": str(ck), "task": task, "method": cfg["method"], "tune_examples": len(sets["tune"]),
           "fp32": {k: v[1] for k, v in base.items()}, "variants": {}}
    for v in variants:
        group, alpha = (v.split(":") + ["0.5"])[:2]
        p = work / "v.onnx"
        shutil.copy(fp32, p)
        want = GROUPS[group]
        quantize_int8(p, ref, stats=None if group == "none" else stats, alpha=float(alpha),
                      smooth_only=lambda n: kind[n] in want)
        s = session(p)
        res = {}
        for k, (f, g) in feeds.items():
            _, res[k] = score(s, f, g, base[k][0])
            res[k]["delta_points"] = 100 * (res[k]["acc"] - row["fp32"][k]["acc"])
        row["variants"][v] = res
        print(f"{name} {v:12s} " + "  ".join(f"{k}: {r['delta_points']:+.1f} pts err {r['mean_abs_err']:.4f} "
                                              f"max {r['max_abs_err']:.3f} agree {100 * r['argmax_agree']:.1f}%"
                                              for k, r in res.items()), file=sys.stderr, flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--variants", nargs="+", default=["none", "all:0.5", "ffn_out:0.5", "ln:0.5", "o:0.5"])
    ap.add_argument("--tune", type=int, default=1000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hpeft-bench-int8-smooth-"))
    rows = [run(ck, work / ck.name, args.variants, args.tune) for ck in args.checkpoints]
    doc = {"calibration": f"{len(calibration_texts())} training sentences (calibration_texts)", "rows": rows,
           "load": open("/proc/loadavg").read().split()[:3]}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))
    else:
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
