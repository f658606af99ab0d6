"""`hpeft train`: train an adapter of a named method on a task, print its held-out metrics, save a checkpoint.

A classification task (labelled texts) trains a classifier and ends with `accuracy: 0.xxx`; a retrieval task
(bbc_retrieval, or a file of query/positive pairs) trains an embedding adapter and ends with
`recall@1: 0.xxx (backbone 0.yyy) recall@10: ... mrr@10: ...`, the plain backbone pooled the same way beside it.
"""

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
    p.add_argument("--task", required=True, help="rotten_tomatoes, bbc_news, or a .csv/.jsonl file (text,label): "
                   "a classifier; bbc_retrieval, or a .csv/.jsonl file (query,positive[,negative]): an embedder")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--train-size", type=int, default=None, help="number of training examples (default: all)")
    p.add_argument("--eval-size", type=int, default=None, help="held-out examples (default 1000; retrieval 500)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are truncated)")
    p.add_argument("--lr", type=float, default=None, help="adapter learning rate (default: the method's)")
    p.add_argument("--pooling", choices=("mean", "cls", "max"), default=None,
                   help="head input: token mean, first token, or token max (embedding only); default: mean for a "
                   "classifier, the backbone's sentence-transformers pooling for an embedder (MiniLM: mean)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="embedding tasks: L2-normalise the embedding (default: as the backbone's "
                   "sentence-transformers config says; MiniLM: yes)")
    p.add_argument("--hard-negatives", action="store_true",
                   help="embedding tasks: give every training pair without a negative one mined by the plain "
                   "backbone (its highest-ranked other positive)")
    p.add_argument("--symmetric", action="store_true",
                   help="embedding tasks: symmetric ranking loss (also each positive picks its query among the batch's)")
    p.add_argument("--val-size", type=int, default=None, metavar="N",
                   help="embedding tasks, for tuning: train on all but the last N training pairs and report on those "
                   "N instead of the held-out set (which is then not read)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method setting, e.g. --set r=16 --set sparsity=0.6 --set pruner=grasp (list below)")
    p.add_argument("--name", default=None, help="adapter name (default: the --out folder's name); letters, "
                   "digits, '.', '_', '-'")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from .. import checkpoint
    from ..backbone import load_backbone
    from ..data import task_kind
    from ..methods.presets import parse_overrides, resolve
    from ..training import TrainConfig, build_model, train

    checkpoint.check_name(args.name or args.out.name)
    embedding = task_kind(args.task) == "embedding"
    if args.val_size is not None and not embedding:
        from ..errors import ConfigError
        raise ConfigError(f"--val-size applies to embedding (retrieval) tasks only; {args.task!r} is a "
                          "classification task")
    if args.symmetric and not embedding:
        from ..errors import ConfigError
        raise ConfigError(f"--symmetric applies to embedding (retrieval) tasks only; {args.task!r} is a "
                          "classification task")
    backbone = load_backbone(args.backbone)
    method = resolve(args.method, backbone.config.num_hidden_layers, parse_overrides(args.set))
    data, head, what = (_embedding_task if embedding else _classification_task)(args, backbone)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                      lr=args.lr, symmetric=args.symmetric)
    model = build_model(backbone, method, head, args.seed)
    n_adapter = sum(p.numel() for p in model.adapters.parameters())
    n_backbone = sum(p.numel() for p in model.encoder.parameters())
    print(f"{args.method} on {backbone.name}: {len(data.train)} training / {len(data.test)} held-out {what}; "
          f"trainable adapter parameters {n_adapter:,} ({100 * n_adapter / n_backbone:.3f}% of the backbone)")
    tokenizer = backbone.tokenizer()
    if args.hard_negatives:
        data = _with_negatives(args, data, model, tokenizer, cfg)
    result = train(model, tokenizer, data, cfg, progress=not args.quiet)
    scores = dict(result.metrics)
    if embedding:
        from ..training import backbone_embedder, evaluate_retrieval
        scores["backbone"] = evaluate_retrieval(backbone_embedder(model), tokenizer, data.test, cfg.max_length,
                                                cfg.eval_batch_size)
    meta = {"task": data.name, "train": {"train_size": len(data.train), "epochs": args.epochs, "seed": args.seed,
            "batch_size": args.batch_size, "max_length": args.max_length, "steps": result.steps,
            "seconds": round(result.train_seconds, 1)}, "metrics": scores}
    if embedding:
        meta["train"].update(hard_negatives=args.hard_negatives, symmetric=args.symmetric, lr=cfg.lr or method.lr)
        if args.val_size is not None:
            meta["train"]["validation_carve"] = args.val_size  # metrics are on the carve, not the held-out set
    checkpoint.save(model, backbone, args.out, getattr(data, "labels", ()), meta, name=args.name)
    print(f"trained {result.steps} steps in {result.train_seconds:.1f}s; checkpoint: {args.out}")
    if embedding:
        from ..retrieval import summary
        print(summary(scores, scores["backbone"]))
    else:
        print(f"accuracy: {result.accuracy:.3f}")
    return 0


def _with_negatives(args, data, model, tokenizer, cfg):
    """data with a hard negative, mined by the plain backbone, for every training pair that lacks one."""
    from dataclasses import replace
    from ..errors import ConfigError
    from ..training import backbone_embedder, mine_negatives
    if not model.head.cfg.embedding:
        raise ConfigError(f"--hard-negatives applies to embedding (retrieval) tasks only; {args.task!r} is a "
                          "classification task")
    return replace(data, train=mine_negatives(backbone_embedder(model), tokenizer, data.train, cfg.max_length,
                                              cfg.eval_batch_size))


def _classification_task(args, backbone):
    """(data, head, description) of a labelled task."""
    from ..data import load_task
    from ..errors import ConfigError
    from ..model import HeadConfig
    if args.normalize is not None:
        raise ConfigError("--normalize/--no-normalize applies to embedding (retrieval) tasks only; "
                          f"{args.task!r} is a classification task")
    data = load_task(args.task, args.train_size, 1000 if args.eval_size is None else args.eval_size)
    head = HeadConfig(len(data.labels), args.pooling or "mean")
    return data, head, f"examples of {data.name} ({len(data.labels)} labels)"


def _embedding_task(args, backbone):
    """(data, head, description) of a retrieval task: an embedding head, pooling and normalisation from the
    flags or else the backbone's sentence-transformers config."""
    from ..data import RETRIEVAL_EVAL_SIZE, load_pairs
    from ..model import HeadConfig
    data = load_pairs(args.task, args.train_size, RETRIEVAL_EVAL_SIZE if args.eval_size is None else args.eval_size)
    if args.val_size is not None:
        from ..retrieval import validation_carve
        data = validation_carve(data, args.val_size)
    pooling, normalize = backbone.embedding_defaults()
    head = HeadConfig(0, args.pooling or pooling, task="embedding",
                      normalize=normalize if args.normalize is None else args.normalize)
    norm = "normalised" if head.normalize else "not normalised"
    return data, head, f"pairs of {data.name} (embedding: {head.pooling} pooling, {norm})"
