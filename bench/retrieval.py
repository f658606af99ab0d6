"""Retrieval quality of embedding adapters on the real MiniLM and real data (the README table).

Task bbc_retrieval: query = a BBC article's headline, positive = its body; 500 held-out pairs, each held-out
headline ranked against all 500 held-out bodies by cosine similarity. Every method trains on the same pairs
with the same seed and budget (multiple-negatives ranking loss, in-batch negatives, scale 20), pooled and
normalised as MiniLM's sentence-transformers config says (mean, L2); the plain backbone, pooled the same
way, is the baseline (what a user has today). Reports recall@1, recall@10, MRR@10 and training seconds.

    python bench/retrieval.py                              # the README table (~12 min on 2 idle cores at ~3.6 s a step; much longer on busy ones)
    python bench/retrieval.py --methods lora --train-size 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hpeft_serve.backbone import load_backbone
from hpeft_serve.data import PairDataset, load_pairs
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.training import (TrainConfig, backbone_embedder, build_model, evaluate_retrieval, mine_negatives,
                                  train)

METHODS = ["lora", "adapter", "compacter_pp", "unipelt", "mam"]


def baseline(backbone, head: HeadConfig, data, cfg: TrainConfig) -> dict:
    model = build_model(backbone, resolve("lora", backbone.config.num_hidden_layers), head, cfg.seed)
    t0 = time.perf_counter()
    scores = evaluate_retrieval(backbone_embedder(model), backbone.tokenizer(), data.test, cfg.max_length,
                                cfg.eval_batch_size)
    return {"method": "backbone (no adapter)", "params": 0, **scores, "train_s": 0.0,
            "eval_s": time.perf_counter() - t0}


def run_one(backbone, name: str, head: HeadConfig, data, cfg: TrainConfig, progress: bool) -> dict:
    model = build_model(backbone, resolve(name, backbone.config.num_hidden_layers), head, cfg.seed)
    t0 = time.perf_counter()
    res = train(model, backbone.tokenizer(), data, cfg, progress=progress)
    model.adapters.eject_prefix()  # parameters as served (a prefix's training MLP is not part of it)
    return {"method": name, "params": sum(p.numel() for p in model.adapters.parameters()), **res.metrics,
            "train_s": res.train_seconds, "eval_s": time.perf_counter() - t0 - res.train_seconds,
            "steps": res.steps, "final_loss": sum(res.losses[-5:]) / len(res.losses[-5:])}


def table(rows: list[dict], n_backbone: int) -> str:
    base = rows[0]
    lines = ["| method | params (% backbone) | recall@1 | vs backbone | recall@10 | MRR@10 | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "" if r is base else f"{100 * (r['recall@1'] - base['recall@1']):+.1f} pts"
        lines.append(f"| {r['method']} | {100 * r['params'] / n_backbone:.3f}% | {r['recall@1']:.3f} | {delta} | "
                     f"{r['recall@10']:.3f} | {r['mrr@10']:.3f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--train-size", type=int, default=1024, help="training pairs (same for every method)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per step (each query's in-batch negatives)")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per headline or body, train and eval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-hard-negatives", dest="hard_negatives", action="store_false",
                    help="in-batch negatives only (default: also one hard negative per pair, mined by the backbone)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars (one line per method still)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/retrieval.md"))
    args = ap.parse_args()
    backbone = load_backbone("minilm")
    pooling, normalize = backbone.embedding_defaults()
    head = HeadConfig(0, pooling, task="embedding", normalize=normalize)
    data = load_pairs("bbc_retrieval", args.train_size)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    n_backbone = sum(p.numel() for p in backbone.build_encoder().parameters())
    t0 = time.perf_counter()
    rows = [baseline(backbone, head, data, cfg)]
    if args.hard_negatives:
        plain = backbone_embedder(build_model(backbone, resolve("lora", backbone.config.num_hidden_layers), head))
        data = PairDataset(data.name, mine_negatives(plain, backbone.tokenizer(), data.train, cfg.max_length),
                           data.test)
        print(f"mined one hard negative per training pair with the backbone ({time.perf_counter() - t0:.0f}s)",
              file=sys.stderr, flush=True)
    log = lambda r, i: print(f"[{i}/{len(args.methods)} {time.perf_counter() - t0:.0f}s] {r['method']:<22} "
                             f"recall@1 {r['recall@1']:.3f} recall@10 {r['recall@10']:.3f} mrr@10 {r['mrr@10']:.3f} "
                             f"train {r['train_s']:.0f}s", file=sys.stderr, flush=True)
    log(rows[0], 0)
    for i, name in enumerate(args.methods, 1):
        rows.append(run_one(backbone, name, head, data, cfg, not args.quiet))
        log(rows[-1], i)
    setup = (f"MiniLM (all-MiniLM-L6-v2), {pooling} pooling, {'normalised' if normalize else 'not normalised'}; "
             f"bbc_retrieval: {len(data.train)} training pairs x {args.epochs} epoch(s), batch {args.batch_size} "
             f"(in-batch negatives{' + one mined hard negative per pair' if args.hard_negatives else ''}), "
             f"{args.max_length} tokens, seed {args.seed}; {len(data.test)} held-out "
             f"headlines each ranked against all {len(data.test)} held-out bodies; {torch.get_num_threads()} "
             f"threads, total {time.perf_counter() - t0:.0f}s")
    text = f"{setup}\n\n{table(rows, n_backbone)}\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
