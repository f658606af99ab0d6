"""Quality of every method on the real MiniLM backbone and real data, low-resource (README table).

Every method of the library, a full fine-tune of the same backbone, and a dense adapter with the non-zero
count of the SparseAdapter, on rotten_tomatoes and bbc_news with 200 and 1,000 training examples and a
fixed held-out set; reports accuracy, trainable parameters (% of the backbone, prefixes counted ejected)
and training time. Same number of optimiser steps for both sizes (200 x 5 epochs, 1,000 x 1 epoch).

    python bench/quality.py                       # everything (~30 min on 2 cores)
    python bench/quality.py --tasks rotten_tomatoes --sizes 200 --methods adapter unipelt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hpeft_serve.backbone import load_backbone
from hpeft_serve.data import load_task
from hpeft_serve.methods.config import MethodConfig
from hpeft_serve.methods.presets import method_names, resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.training import TrainConfig, build_model, train

MAX_LENGTH = {"rotten_tomatoes": 64, "bbc_news": 64}  # BBC: the headline and lead carry the topic
EPOCHS = {200: 5, 1000: 1}
EXTRA = {  # name -> (preset, overrides): baselines beside the presets
    "full_finetune": (None, {}),
    "adapter_nnz_of_sparse": ("adapter", {"bottleneck": 14}),  # ~ the non-zeros of sparse_adapter (24 x 60%)
}


def method_config(name: str, layers: int) -> MethodConfig:
    if name == "full_finetune":
        return MethodConfig("full_finetune", ())
    if name in EXTRA:
        preset, overrides = EXTRA[name]
        return resolve(preset, layers, overrides)
    return resolve(name, layers)


def inference_params(model) -> int:
    """Adapter parameters as served: prefixes ejected, sparse weights counted by non-zeros."""
    model.adapters.eject_prefix()
    n = sum(p.numel() for p in model.adapters.parameters())
    for p in model.adapters.sparse_projections():
        n -= int((~p.sparse_mask).sum())
    return n


def run_one(backbone, name: str, task: str, size: int, eval_size: int, seed: int) -> dict:
    data = load_task(task, size, eval_size)
    mc = method_config(name, backbone.config.num_hidden_layers)
    model = build_model(backbone, mc, HeadConfig(len(data.labels)), seed)
    full = name == "full_finetune"
    cfg = TrainConfig(epochs=EPOCHS.get(size, 1), max_length=MAX_LENGTH[task], seed=seed, full=full)
    res = train(model, backbone.tokenizer(), data, cfg, progress=False)
    n_backbone = sum(p.numel() for p in model.encoder.parameters())
    n = n_backbone if full else inference_params(model)
    return {"method": name, "task": task, "train_size": size, "accuracy": res.accuracy, "params": n,
            "params_pct": 100 * n / n_backbone, "train_s": res.train_seconds, "steps": res.steps}


def table(rows: list[dict], tasks, sizes) -> str:
    cols = [(t, s) for t in tasks for s in sizes]
    head = "| method | params (% backbone) | " + " | ".join(f"{t} {s}" for t, s in cols) + " | train s (median) |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    by = {(r["method"], r["task"], r["train_size"]): r for r in rows}
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [by.get((m, t, s)) for t, s in cols]
        pct = next(r["params_pct"] for r in rs if r)
        secs = sorted(r["train_s"] for r in rs if r)
        cells = " | ".join(f"{r['accuracy']:.3f}" if r else "-" for r in rs)
        lines.append(f"| {m} | {pct:.3f}% | {cells} | {secs[len(secs) // 2]:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(MAX_LENGTH))
    ap.add_argument("--sizes", nargs="+", type=int, default=[200, 1000])
    ap.add_argument("--methods", nargs="+", default=["full_finetune"] + method_names() + ["adapter_nnz_of_sparse"])
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = load_backbone("minilm")
    rows, t0 = [], time.perf_counter()
    runs = [(m, t, s) for t in args.tasks for s in args.sizes for m in args.methods]
    for i, (m, t, s) in enumerate(runs, 1):
        r = run_one(backbone, m, t, s, args.eval_size, args.seed)
        rows.append(r)
        print(f"[{i}/{len(runs)} {time.perf_counter() - t0:.0f}s] {m:<22} {t:<16} n={s:<5} "
              f"acc {r['accuracy']:.3f}  params {r['params_pct']:.3f}%  train {r['train_s']:.1f}s",
              file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    print(f"\nMiniLM (all-MiniLM-L6-v2), held-out {args.eval_size} per task, seed {args.seed}, "
          f"{torch.get_num_threads()} threads, total {time.perf_counter() - t0:.0f}s\n")
    print(table(rows, args.tasks, args.sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
