"""Retrieval quality of embedding adapters on the real MiniLM and real data (the README table).

Task bbc_retrieval: query = a BBC article's headline, positive = its body; 500 held-out pairs, each held-out
headline ranked against all 500 held-out bodies by cosine similarity. Every method trains on the same pairs
with the same seed and budget (multiple-negatives ranking loss, in-batch negatives, scale 20), pooled and
normalised as MiniLM's sentence-transformers config says (mean, L2); the plain backbone, pooled the same
way, is the baseline (what a user has today). Reports recall@1, recall@10, MRR@10 and training seconds.

    python bench/retrieval.py          # the README table: all 1,560 training pairs, 1 epoch (49 steps) a method
    python bench/retrieval.py --methods lora --train-size 200 --no-symmetric

The README table ran as part runs at once (one method each, one thread each, sharing one mining of the hard
negatives), then merged:

    for m in lora adapter compacter_pp unipelt mam; do
      OMP_NUM_THREADS=1 python bench/retrieval.py --methods $m --negatives /tmp/neg.json \\
        $([ $m = mam ] || echo --no-baseline) --out bench/results/retrieval-part-$m.md &
    done; wait    # (start one first: the others may wait for /tmp/neg.json instead of mining it again)
    python bench/retrieval.py --merge bench/results/retrieval-part-*.json

Tuning never reads the held-out set: --val-size N trains on all but the last N pairs of the (already shuffled)
training pool and reports on those N (bench/results/retrieval-val-*), e.g.

    OMP_NUM_THREADS=1 python bench/retrieval.py --methods lora --val-size 300 --lr 3e-3 --max-length 128 \\
        --out bench/results/retrieval-val-128-lr3e-3-lora.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hpeft_serve.backbone import load_backbone
from hpeft_serve.data import Pair, PairDataset, load_pairs
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.retrieval import validation_carve
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
            "lr": cfg.lr or model.adapters.method_config.lr, "steps": res.steps,
            "first_loss": sum(res.losses[:5]) / len(res.losses[:5]),
            "final_loss": sum(res.losses[-5:]) / len(res.losses[-5:])}


def with_negatives(backbone, head: HeadConfig, train: list[Pair], max_length: int, cache: Path | None) -> list[Pair]:
    """train, each pair with the backbone's hardest other positive (mine_negatives); cache: a JSON file to reuse."""
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["max_length"] != max_length or [p[:2] for p in saved["pairs"]] != [[p.query, p.positive] for p in train]:
            raise SystemExit(f"{cache} holds negatives of other training pairs or another --max-length")
        return [Pair(*p) for p in saved["pairs"]]
    plain = backbone_embedder(build_model(backbone, resolve("lora", backbone.config.num_hidden_layers), head))
    mined = mine_negatives(plain, backbone.tokenizer(), train, max_length)
    if cache is not None:
        tmp = cache.with_name(cache.name + ".part")
        tmp.write_text(json.dumps({"max_length": max_length, "pairs": [list(p) for p in mined]}))
        tmp.replace(cache)  # whole or absent: part runs waiting for the file never read half of it
    return mined


def table(rows: list[dict], n_backbone: int) -> str:
    base = rows[0]
    lines = ["| method | params (% backbone) | recall@1 | vs backbone | recall@10 | MRR@10 | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "" if r is base else f"{100 * (r['recall@1'] - base['recall@1']):+.1f} pts"
        lines.append(f"| {r['method']} | {100 * r['params'] / n_backbone:.3f}% | {r['recall@1']:.3f} | {delta} | "
                     f"{r['recall@10']:.3f} | {r['mrr@10']:.3f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--train-size", type=int, default=None, help="training pairs (same for every method; default: all)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per step (each query's in-batch negatives)")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per headline or body, train and eval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None, help="adapter learning rate (default: each method's preset)")
    ap.add_argument("--val-size", type=int, default=None, metavar="N",
                    help="tuning: hold the last N pairs of the (shuffled) training pool out as validation and "
                    "report on them instead of the held-out set, which is not read (train on the rest)")
    ap.add_argument("--no-hard-negatives", dest="hard_negatives", action="store_false",
                    help="in-batch negatives only (default: also one hard negative per pair, mined by the backbone)")
    ap.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True,
                    help="symmetric ranking loss: also each positive picks its query among the batch's (default: yes)")
    ap.add_argument("--negatives", type=Path, metavar="JSON",
                    help="mined hard negatives: read from this file when it is there (checked against the training "
                    "pairs and --max-length), else mined and written to it (part runs at once share one mining)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the plain backbone's row (a part run, to --merge with one that has it)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="no training: one table from part runs' .json files of the same setting (one has the baseline)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars (one line per method still)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/retrieval.md"))
    return ap.parse_args()


def write(out: Path, setup: str, rows: list[dict], n_backbone: int, run: str, **extra) -> None:
    """out (.md: the setup, how it ran, the table if the run has the baseline) and out's .json."""
    tab = f"\n\n{table(rows, n_backbone)}" if rows and rows[0]["params"] == 0 else ""
    text = f"{setup}; {run}{tab}\n"
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "n_backbone": n_backbone, **extra,
                                                    "rows": rows}, indent=1))


def merge(files: list[Path], out: Path) -> int:
    """One table from part runs: the same setup, exactly one baseline row, each method once."""
    parts = [json.loads(f.read_text()) for f in files]
    setups = {p["setup"] for p in parts}
    if len(setups) != 1:
        raise SystemExit(f"cannot merge runs of different settings: {sorted(setups)}")
    rows = [r for p in parts for r in p["rows"]]
    base = [r for r in rows if r["params"] == 0]
    names = [r["method"] for r in rows if r["params"]]
    if len(base) != 1 or len(set(names)) != len(names):
        raise SystemExit(f"need exactly one baseline row and each method once; got {len(base)} baselines, {names}")
    order = {m: i for i, m in enumerate(METHODS)}
    rows = base + sorted((r for r in rows if r["params"]), key=lambda r: order.get(r["method"], len(order)))
    run = " + ".join(f"{p['threads']} threads {p['wall_s']}s" for p in parts)
    write(out, setups.pop(), rows, parts[0]["n_backbone"], f"{len(parts)} part runs at once ({run})",
          wall_s=[p["wall_s"] for p in parts], threads=[p["threads"] for p in parts])
    return 0


def main() -> int:
    args = parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    backbone = load_backbone("minilm")
    pooling, normalize = backbone.embedding_defaults()
    head = HeadConfig(0, pooling, task="embedding", normalize=normalize)
    data = load_pairs("bbc_retrieval", args.train_size)
    if args.val_size is not None:
        data = validation_carve(data, args.val_size)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                      lr=args.lr, symmetric=args.symmetric)
    n_backbone = sum(p.numel() for p in backbone.build_encoder().parameters())
    t0 = time.perf_counter()
    log = lambda r, i: print(f"[{i}/{len(args.methods)} {time.perf_counter() - t0:.0f}s] {r['method']:<22} "
                             f"recall@1 {r['recall@1']:.3f} recall@10 {r['recall@10']:.3f} mrr@10 {r['mrr@10']:.3f} "
                             f"train {r['train_s']:.0f}s", file=sys.stderr, flush=True)
    rows = [baseline(backbone, head, data, cfg)] if args.baseline else []
    if rows:
        log(rows[0], 0)
    if args.hard_negatives:
        data = PairDataset(data.name, with_negatives(backbone, head, data.train, cfg.max_length, args.negatives),
                           data.test)
        print(f"one hard negative per training pair, mined by the backbone ({time.perf_counter() - t0:.0f}s)",
              file=sys.stderr, flush=True)
    for i, name in enumerate(args.methods, 1):
        rows.append(run_one(backbone, name, head, data, cfg, not args.quiet))
        log(rows[-1], i)
    lr_text = "each method's learning rate" if args.lr is None else f"learning rate {args.lr:g}"
    setup = (f"MiniLM (all-MiniLM-L6-v2), {pooling} pooling, {'normalised' if normalize else 'not normalised'}; "
             f"bbc_retrieval: {len(data.train)} training pairs x {args.epochs} epoch(s), batch {args.batch_size} "
             f"(in-batch negatives{' + one mined hard negative per pair' if args.hard_negatives else ''}; "
             f"{'symmetric ' if args.symmetric else ''}ranking loss, scale 20; "
             f"{lr_text}), "
             f"{args.max_length} tokens, seed {args.seed}; "
             + (f"{len(data.test)} held-out headlines each ranked against all {len(data.test)} held-out bodies"
                if args.val_size is None else
                f"VALIDATION: {len(data.test)} pairs carved from the training pool (held-out set not used), "
                "each headline ranked against all their bodies"))
    wall = time.perf_counter() - t0
    write(args.out, setup, rows, n_backbone, f"{torch.get_num_threads()} threads, total {wall:.0f}s",
          wall_s=round(wall), threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
