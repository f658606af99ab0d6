"""`hpeft train`: train an adapter of a named method on a task, print held-out accuracy, save a checkpoint."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    from ..assets import TINY_NAMES
    import argparse
    from ..methods.config import settings_help
    from ..methods.presets import method_names
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "settings for --set KEY=VALUE (a setting applies to every component of the method that has it):\n" + \
        "\n".join(f"  {k}: {v}" for k, v in settings_help().items())
    p.add_argument("--backbone", default="minilm", help="minilm, a tiny random backbone (" + ", ".join(TINY_NAMES) + ") or a Hugging Face folder")
    p.add_argument("--method", required=True, choices=method_names(), metavar="METHOD",
                   help="one of: " + ", ".join(method_names()))
    p.add_argument("--task", required=True, help="rotten_tomatoes, bbc_news, or a .csv/.jsonl file (text,label)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--train-size", type=int, default=None, help="number of training examples (default: all)")
    p.add_argument("--eval-size", type=int, default=1000, help="held-out examples (default 1000)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are truncated)")
    p.add_argument("--lr", type=float, default=None, help="adapter learning rate (default: the method's)")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="head input: token mean or first token")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method setting, e.g. --set r=16 --set sparsity=0.6 --set pruner=grasp (list below)")
    p.add_argument("--name", default=None, help="adapter name (default: the --out folder's name); letters, "
                   "digits, '.', '_', '-'")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from .. import checkpoint
    from ..backbone import load_backbone
    from ..data import load_task
    from ..methods.presets import parse_overrides, resolve
    from ..model import HeadConfig
    from ..training import TrainConfig, build_model, train

    checkpoint.check_name(args.name or args.out.name)
    backbone = load_backbone(args.backbone)
    method = resolve(args.method, backbone.config.num_hidden_layers, parse_overrides(args.set))
    data = load_task(args.task, args.train_size, args.eval_size)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                      lr=args.lr)
    model = build_model(backbone, method, HeadConfig(len(data.labels), args.pooling), args.seed)
    n_adapter = sum(p.numel() for p in model.adapters.parameters())
    n_backbone = sum(p.numel() for p in model.encoder.parameters())
    print(f"{args.method} on {backbone.name}: {len(data.train)} training / {len(data.test)} held-out examples of "
          f"{data.name} ({len(data.labels)} labels); trainable adapter parameters {n_adapter:,} "
          f"({100 * n_adapter / n_backbone:.3f}% of the backbone)")
    result = train(model, backbone.tokenizer(), data, cfg, progress=not args.quiet)
    out = args.out
    meta = {"task": data.name, "train": {"train_size": len(data.train), "epochs": args.epochs, "seed": args.seed,
            "batch_size": args.batch_size, "max_length": args.max_length, "steps": result.steps,
            "seconds": round(result.train_seconds, 1)}, "metrics": {"accuracy": result.accuracy}}
    checkpoint.save(model, backbone, out, data.labels, meta, name=args.name)
    print(f"trained {result.steps} steps in {result.train_seconds:.1f}s; checkpoint: {out}")
    print(f"accuracy: {result.accuracy:.3f}")
    return 0
