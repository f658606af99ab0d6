"""`hpeft search`: S4 strategy search per layer group; prints a table of what it tried."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    from ..assets import TINY_NAMES
    p.add_argument("--backbone", default="minilm", help="minilm, a tiny random backbone (" + ", ".join(TINY_NAMES) + ") or a Hugging Face folder")
    p.add_argument("--task", required=True, help="rotten_tomatoes, bbc_news, or a .csv/.jsonl file")
    p.add_argument("--train-size", type=int, default=400, help="training examples (a quarter becomes the dev split)")
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--trials", type=int, default=8, help="budget: number of assignments to train and score")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="write the trials as JSON here")


def run(args) -> int:
    from ..backbone import load_backbone
    from ..data import load_task
    from ..errors import ConfigError
    from ..s4 import search, table
    from ..training import TrainConfig

    if args.trials < 1:
        raise ConfigError("--trials must be >= 1")
    backbone = load_backbone(args.backbone)
    data = load_task(args.task, args.train_size, args.eval_size)
    cfg = TrainConfig(epochs=args.epochs, max_length=args.max_length, seed=args.seed)
    trials = search(backbone, data, cfg, args.trials)
    print(table(trials))
    best = max(trials, key=lambda t: t.dev_accuracy)
    print(f"best: groups {best.groups} (train it: hpeft train --method s4 ... uses the paper's default; "
          f"this assignment is recorded in --out)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([t.__dict__ for t in trials], indent=2))
    return 0
