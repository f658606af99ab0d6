"""int8 vs fp32 on trained adapters (README table): for each checkpoint, its merged ONNX export in fp32 and
with `--quantize int8` (the default: smoothed, then int8 per output channel; and not smoothed, `smooth=False`,
the default before the smoothing), on the task's held-out set:
accuracy of each, the change in points, the largest logit difference vs fp32, argmax agreement, and the
time of one pass over the held-out set (batches of 32, 2 threads, fp32 / int8 alternating by batch).
The shared graph in int8 is checked to give the merged int8 answers on the first batch.

    hpeft train --backbone minilm --method lora --task rotten_tomatoes --out runs/rt-lora ...   # and so on
    python bench/quantize.py runs/rt-lora runs/bbc-unipelt ... [--out bench/results/quantize.json] [--append]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exporters.export import export_checkpoint
from hpeft_serve import checkpoint
from hpeft_serve.backbone import load_backbone
from hpeft_serve.data import load_task
from hpeft_serve.serving.runtime import SharedRuntime

MAX_LENGTH = 64  # as bench/quality.py trains and evaluates


def batches(tokenizer, texts: list[str], size: int = 32):
    for i in range(0, len(texts), size):
        enc = tokenizer(texts[i:i + size], truncation=True, max_length=MAX_LENGTH, padding=True,
                        return_tensors="np")
        yield enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_one(ckpt: Path, work: Path, eval_size: int, threads: int) -> dict:
    model, cfg = checkpoint.load(ckpt)
    task = cfg.get("task") or cfg.get("train", {}).get("task")
    data = load_task(task, None, eval_size)
    name = cfg["name"]
    out = work / name
    export_checkpoint(ckpt, out / "fp32", merged=True, log=lambda *_: None)
    info = export_checkpoint(ckpt, out / "int8", merged=True, quantize="int8", log=lambda *_: None)
    export_checkpoint(ckpt, out / "int8-plain", merged=True, quantize="int8", smooth=False, log=lambda *_: None)
    sess = {"fp32": session(out / "fp32" / f"{name}.onnx", threads),
            "int8": session(out / "int8" / f"{name}.onnx", threads),
            "int8 not smoothed": session(out / "int8-plain" / f"{name}.onnx", threads)}
    tok = load_backbone(cfg["backbone"]["name"]).tokenizer()
    texts, gold = [t for t, _ in data.test], np.array([y for _, y in data.test])
    logits = {k: [] for k in sess}
    secs = {k: 0.0 for k in sess}
    first = None
    for ids, mask in batches(tok, texts):
        first = first or (ids, mask)
        for k, s in sess.items():
            t = time.perf_counter()
            logits[k].append(s.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0])
            secs[k] += time.perf_counter() - t
    logits = {k: np.concatenate(v) for k, v in logits.items()}
    acc = {k: float((v.argmax(1) == gold).mean()) for k, v in logits.items()}
    row = {"checkpoint": str(ckpt), "name": name, "method": cfg["method"], "task": task, "n": len(gold),
           "acc_fp32": acc["fp32"], "logit_scale": float(np.abs(logits["fp32"]).max()), "train": train_recipe(cfg)}
    row["smoothing"] = info["quantization"].get("smoothing")
    for k in ("int8", "int8 not smoothed"):
        row[k] = {"acc": acc[k], "delta_points": 100 * (acc[k] - acc["fp32"]),
                  "max_logit_diff": float(np.abs(logits[k] - logits["fp32"]).max()),
                  "argmax_agree": float((logits[k].argmax(1) == logits["fp32"].argmax(1)).mean()),
                  "speedup": secs["fp32"] / secs[k]}
    row["fp32_s"] = secs["fp32"]
    row["load"] = open("/proc/loadavg").read().split()[:3]
    export_checkpoint(ckpt, out / "shared-int8", quantize="int8", log=lambda *_: None)
    got = np.stack(SharedRuntime(out / "shared-int8", threads=threads).infer(*first, [name] * len(first[0]))[0])
    row["shared_vs_merged_int8"] = float(np.abs(got - logits["int8"][:len(got)]).max())
    return row


def train_recipe(cfg: dict) -> str:
    """How the checkpoint was trained, from its config: examples x epochs at max tokens."""
    t = cfg.get("train") or {}
    return f"{t['train_size']} x {t['epochs']} at {t['max_length']}" if t.get("train_size") else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantize.json"))
    ap.add_argument("--append", action="store_true", help="keep the rows already in --out (of other checkpoints)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hpeft-bench-quantize-"))
    rows = json.loads(args.out.read_text()) if args.append and args.out.is_file() else []
    for ck in args.checkpoints:
        row = run_one(ck, work, args.eval_size, args.threads)
        rows = [r for r in rows if (r["name"], r.get("train")) != (row["name"], row["train"])] + [row]
        r = rows[-1]
        print(f"{r['name']}: fp32 {r['acc_fp32']:.3f} int8 {r['int8']['acc']:.3f}", file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    report(rows, args)
    return 0


def report(rows: list[dict], args) -> None:
    print(f"MiniLM merged ONNX, held-out {args.eval_size} per task (max {MAX_LENGTH} tokens), "
          f"CPU {args.threads} threads\n")
    print("| task | method | train (examples x epochs at tokens) | fp32 acc | int8 acc | change (points) | max logit diff (logit scale) | argmax agree | "
          "speed-up | not smoothed: change / max diff / argmax agree / speed-up | shared int8 = merged int8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["task"], r["method"], r.get("train", "?"))):
        q, p = r["int8"], r["int8 not smoothed"]
        print(f"| {r['task']} | {r['method']} | {r.get('train', '?')} | {r['acc_fp32']:.3f} | {q['acc']:.3f} | {q['delta_points']:+.1f} | "
              f"{q['max_logit_diff']:.3f} ({r['logit_scale']:.1f}) | {100 * q['argmax_agree']:.1f}% | "
              f"{q['speedup']:.2f}x | "
              f"{p['delta_points']:+.1f} / {p['max_logit_diff']:.3f} / {100 * p['argmax_agree']:.1f}% / {p['speedup']:.2f}x | "
              f"{r['shared_vs_merged_int8']:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
