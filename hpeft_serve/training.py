"""Training and evaluation of a HybridModel: a classifier on labelled texts, or an embedder on query/positive pairs.

Classification: cross-entropy, judged by held-out accuracy. Embedding: multiple-negatives ranking loss
(retrieval.py), judged by recall@1, recall@10 and MRR@10 of held-out queries against every held-out
positive. Deterministic under a seed (adapter init, pruning, shuffling, dropout). Only the adapters and the
head are trained; the backbone stays frozen (except for the `full` fine-tuning baseline of the benchmarks).
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
from .data import Dataset, Pair, PairDataset
from .errors import DataError
from .methods.config import MethodConfig
from .methods.sparse import prune
from .model import HeadConfig, HybridModel
from .retrieval import cos_sim, metrics, mnrl_loss


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
    symmetric: bool = False
    """embedding tasks: the symmetric ranking loss (query -> positive and positive -> query; retrieval.py)"""


@dataclass
class TrainResult:
    accuracy: float
    """classification: held-out accuracy; embedding: nan (see metrics)"""
    steps: int
    train_seconds: float
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    """held-out metrics: {"accuracy"} or {"recall@1", "recall@10", "mrr@10"}"""


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
def predict_logits(model, seqs: list[list[int]], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """model(input_ids, attention_mask) (logits or embeddings) for token-id sequences, batched by length (less
    padding), returned in input order. model: a HybridModel or any callable of a HybridModel's signature."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = None
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        ids, mask = collate([seqs[i] for i in idx], pad_id)
        y = model(ids, mask)
        out = torch.empty(len(seqs), y.shape[1]) if out is None else out
        out[idx] = y
    return out


def evaluate(model: HybridModel, tokenizer, examples: list[tuple[str, int]], max_length: int = 128,
             batch_size: int = 64) -> float:
    seqs = encode(tokenizer, [t for t, _ in examples], max_length)
    logits = predict_logits(model, seqs, tokenizer.pad_token_id, batch_size)
    labels = torch.tensor([y for _, y in examples])
    return (logits.argmax(-1) == labels).float().mean().item()


def backbone_embedder(model: HybridModel):
    """The plain backbone as an embedder (no adapter), pooled and normalised as model's embedding head."""
    model.eval()
    return lambda ids, mask: model.head(model.encoder(ids, mask), mask)


def evaluate_retrieval(model, tokenizer, pairs: list[Pair], max_length: int = 128,
                       batch_size: int = 64) -> dict[str, float]:
    """recall@1, recall@10, MRR@10 of every pair's query against all the pairs' positives.
    model: an embedding HybridModel, or backbone_embedder(model) for the baseline."""
    pad = tokenizer.pad_token_id
    q = predict_logits(model, encode(tokenizer, [p.query for p in pairs], max_length), pad, batch_size)
    d = predict_logits(model, encode(tokenizer, [p.positive for p in pairs], max_length), pad, batch_size)
    return metrics(cos_sim(q, d))


@torch.no_grad()
def mine_negatives(embedder, tokenizer, pairs: list[Pair], max_length: int = 128, batch_size: int = 64,
                   near_duplicate: float = 0.95) -> list[Pair]:
    """The pairs, each with a hard negative: the other positive that embedder (e.g. backbone_embedder(model))
    ranks highest for its query, as sentence-transformers' mine_hard_negatives with one negative. A candidate
    whose cosine to the pair's own positive is >= near_duplicate is skipped (the same story, not a negative).
    Pairs that already have a negative keep it."""
    pad = tokenizer.pad_token_id
    q = predict_logits(embedder, encode(tokenizer, [p.query for p in pairs], max_length), pad, batch_size)
    d = predict_logits(embedder, encode(tokenizer, [p.positive for p in pairs], max_length), pad, batch_size)
    sim = cos_sim(q, d)  # (N, N)
    sim[cos_sim(d, d) >= near_duplicate] = float("-inf")  # includes the diagonal: the positive itself
    best = sim.argmax(dim=1).tolist()
    return [p if p.negative is not None or len(pairs) < 2 else p._replace(negative=pairs[j].positive)
            for p, j in zip(pairs, best)]


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


def _classification_batches(model: HybridModel, tokenizer, data: Dataset, cfg: TrainConfig):
    """(number of training examples, loss of a batch of their indices): cross-entropy on the labels."""
    seqs = encode(tokenizer, [t for t, _ in data.train], cfg.max_length)
    labels = [y for _, y in data.train]
    pad = tokenizer.pad_token_id

    def loss(idx: list[int]) -> torch.Tensor:
        return F.cross_entropy(model(*collate([seqs[i] for i in idx], pad)), torch.tensor([labels[i] for i in idx]))
    return len(seqs), loss


def _embedding_batches(model: HybridModel, tokenizer, data: PairDataset, cfg: TrainConfig):
    """(number of training pairs, loss of a batch of their indices): multiple-negatives ranking loss, the other
    positives of the batch and the batch's hard negatives as negatives (symmetric if cfg.symmetric). Queries,
    positives and negatives are encoded by separate forwards, each padded to its own longest sequence."""
    pad = tokenizer.pad_token_id
    q = encode(tokenizer, [x.query for x in data.train], cfg.max_length)
    p = encode(tokenizer, [x.positive for x in data.train], cfg.max_length)
    with_neg = [i for i, x in enumerate(data.train) if x.negative is not None]
    n = dict(zip(with_neg, encode(tokenizer, [data.train[i].negative for i in with_neg], cfg.max_length))) \
        if with_neg else {}

    def loss(idx: list[int]) -> torch.Tensor:
        negs = [n[i] for i in idx if i in n]
        return mnrl_loss(model(*collate([q[i] for i in idx], pad)), model(*collate([p[i] for i in idx], pad)),
                         model(*collate(negs, pad)) if negs else None, symmetric=cfg.symmetric)
    return len(q), loss


def prune_sparse(model: HybridModel, batch_loss, n: int, seed: int) -> None:
    """SparseAdapter: prune at initialisation on the loss of the first (up to) 64 training examples, model in
    eval mode."""
    settings = model.adapters.sparse_settings()
    if settings is None:
        return
    pruner, sparsity = settings
    idx = list(range(min(64, n)))
    was = model.training
    model.eval()
    prune(model.adapters.sparse_projections(), pruner, sparsity, lambda: batch_loss(idx), seed)
    model.train(was)


def _check_task(model: HybridModel, data) -> None:
    embedding = model.head.cfg.embedding
    if embedding and not isinstance(data, PairDataset):
        raise DataError(f"an embedding model trains on query/positive pairs (a retrieval task), not on "
                        f"the labelled task {data.name!r}")
    if not embedding and isinstance(data, PairDataset):
        raise DataError(f"a classifier trains on labelled texts, not on the retrieval task {data.name!r}; "
                        "give it an embedding head (HeadConfig(0, task='embedding'))")


def held_out(model: HybridModel, tokenizer, data, cfg: TrainConfig) -> dict[str, float]:
    """The model's metrics on data.test: {"accuracy"} for a classifier, recall@1/recall@10/mrr@10 for an embedder."""
    if model.head.cfg.embedding:
        return evaluate_retrieval(model, tokenizer, data.test, cfg.max_length, cfg.eval_batch_size)
    return {"accuracy": evaluate(model, tokenizer, data.test, cfg.max_length, cfg.eval_batch_size)}


def train(model: HybridModel, tokenizer, data: Dataset | PairDataset, cfg: TrainConfig, progress: bool = True,
          evaluate_after: bool = True) -> TrainResult:
    """Train the adapters and head on data.train; return the held-out metrics on data.test (see held_out)."""
    _check_task(model, data)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    batches = _embedding_batches if model.head.cfg.embedding else _classification_batches
    n, batch_loss = batches(model, tokenizer, data, cfg)
    prune_sparse(model, batch_loss, n, cfg.seed)
    total = math.ceil(n / cfg.batch_size) * cfg.epochs
    opt = _optimizer(model, cfg, model.adapters.method_config.lr)
    sched = _schedule(opt, total, cfg.warmup)
    params = [p for g in opt.param_groups for p in g["params"]]
    losses, t0 = [], time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc=f"train {model.adapters.method_config.method}", disable=not progress, unit="step")
    for _ in range(cfg.epochs):
        order = list(range(n))
        rng.shuffle(order)
        for k in range(0, len(order), cfg.batch_size):
            loss = batch_loss(order[k:k + cfg.batch_size])
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
    scores = held_out(model, tokenizer, data, cfg) if evaluate_after else {}
    return TrainResult(scores.get("accuracy", float("nan")), total, seconds, losses, scores)
