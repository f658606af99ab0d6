"""Training and evaluation of a HybridModel on a text-classification dataset.

Deterministic under a seed (adapter init, pruning, shuffling, dropout). Only the adapters and the head
are trained; the backbone stays frozen (except for the `full` fine-tuning baseline of the benchmarks).
SparseAdapter masks are computed once, before the first step, on a batch of training data.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .backbone import Backbone
from .data import Dataset
from .methods.config import MethodConfig
from .methods.sparse import prune
from .model import HeadConfig, HybridModel


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    lr: float | None = None
    """adapter learning rate (None: the method's default)"""
    head_lr: float = 2e-3
    warmup: float = 0.06
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    full: bool = False
    """fine-tune every backbone weight too (baseline)"""
    full_lr: float = 5e-5


@dataclass
class TrainResult:
    accuracy: float
    steps: int
    train_seconds: float
    losses: list[float] = field(default_factory=list)


def build_model(backbone: Backbone, method: MethodConfig, head: HeadConfig, seed: int = 0) -> HybridModel:
    torch.manual_seed(seed)  # adapter and head init
    return HybridModel(backbone.build_encoder(), method, head).freeze_backbone()


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def collate(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence of the batch: (input_ids, attention_mask), int64 (B, S)."""
    s = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), s), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), s), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return ids, mask


@torch.no_grad()
def predict_logits(model: HybridModel, seqs: list[list[int]], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Logits for token-id sequences, batched by length (less padding), returned in input order."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), model.head.cfg.num_labels)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        ids, mask = collate([seqs[i] for i in idx], pad_id)
        out[idx] = model(ids, mask)
    return out


def evaluate(model: HybridModel, tokenizer, examples: list[tuple[str, int]], max_length: int = 128,
             batch_size: int = 64) -> float:
    seqs = encode(tokenizer, [t for t, _ in examples], max_length)
    logits = predict_logits(model, seqs, tokenizer.pad_token_id, batch_size)
    labels = torch.tensor([y for _, y in examples])
    return (logits.argmax(-1) == labels).float().mean().item()


def _optimizer(model: HybridModel, cfg: TrainConfig, method_lr: float) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in model.adapters.parameters() if p.requires_grad], "lr": cfg.lr or method_lr},
              {"params": list(model.head.parameters()), "lr": cfg.head_lr}]
    if cfg.full:
        model.encoder.requires_grad_(True)
        groups.append({"params": list(model.encoder.parameters()), "lr": cfg.full_lr})
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _schedule(opt, total: int, warmup: float):
    w = max(1, int(total * warmup))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / w, max(0.0, (total - s) / max(1, total - w))))


def prune_sparse(model: HybridModel, seqs: list[list[int]], labels: list[int], pad_id: int, seed: int) -> None:
    """SparseAdapter: prune at initialisation on up to 64 training examples, model in eval mode."""
    settings = model.adapters.sparse_settings()
    if settings is None:
        return
    pruner, sparsity = settings
    ids, mask = collate(seqs[:64], pad_id)
    y = torch.tensor(labels[:64])
    was = model.training
    model.eval()
    prune(model.adapters.sparse_projections(), pruner, sparsity, lambda: F.cross_entropy(model(ids, mask), y), seed)
    model.train(was)


def train(model: HybridModel, tokenizer, data: Dataset, cfg: TrainConfig, progress: bool = True,
          evaluate_after: bool = True) -> TrainResult:
    """Train the adapters and head on data.train; return held-out accuracy on data.test."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    seqs = encode(tokenizer, [t for t, _ in data.train], cfg.max_length)
    labels = [y for _, y in data.train]
    pad = tokenizer.pad_token_id
    prune_sparse(model, seqs, labels, pad, cfg.seed)
    steps_per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = _optimizer(model, cfg, model.adapters.method_config.lr)
    sched = _schedule(opt, total, cfg.warmup)
    params = [p for g in opt.param_groups for p in g["params"]]
    losses, t0 = [], time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc=f"train {model.adapters.method_config.method}", disable=not progress, unit="step")
    for _ in range(cfg.epochs):
        order = list(range(len(seqs)))
        rng.shuffle(order)
        for k in range(0, len(order), cfg.batch_size):
            idx = order[k:k + cfg.batch_size]
            ids, mask = collate([seqs[i] for i in idx], pad)
            loss = F.cross_entropy(model(ids, mask), torch.tensor([labels[i] for i in idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    acc = evaluate(model, tokenizer, data.test, cfg.max_length, cfg.eval_batch_size) if evaluate_after else float("nan")
    return TrainResult(acc, total, seconds, losses)
