"""Retrieval: the training loss of embedding adapters and the metrics they are judged by.

Loss: multiple-negatives ranking loss (Henderson et al. 2017, "Efficient Natural Language Response
Suggestion"; sentence-transformers' MultipleNegativesRankingLoss): each query's positive must score above
every other positive of the batch (in-batch negatives) and every given hard negative, on cosine similarity
times a scale (20), by cross-entropy. Symmetric (CLIP's loss, sentence-transformers'
MultipleNegativesSymmetricRankingLoss): the mean of that and the reverse direction, each positive picking its
query among the batch's queries (no extra forward).

Metrics: each held-out query ranks all held-out positives by cosine similarity; recall@k is the fraction
whose own positive is in the top k, MRR@10 the mean of 1/rank over queries ranked <= 10 (0 otherwise).
Ties are broken by candidate order (a stable descending sort), so the metrics are deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import PairDataset
from .errors import DataError

SCALE = 20.0
METRICS = ("recall@1", "recall@10", "mrr@10")


def cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a, p=2.0, dim=-1) @ F.normalize(b, p=2.0, dim=-1).T


def mnrl_loss(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
              scale: float = SCALE, symmetric: bool = False) -> torch.Tensor:
    """Multiple-negatives ranking loss. queries, positives (B, D): row i of each is a pair; negatives (N, D),
    optional: hard negatives, candidates for every query beside the B positives. Mean over the B queries.
    symmetric: the mean of that and positive -> query (each positive against the B queries)."""
    candidates = positives if negatives is None or len(negatives) == 0 else torch.cat([positives, negatives])
    scores = cos_sim(queries, candidates) * scale  # (B, B + N)
    gold = torch.arange(len(queries), device=scores.device)
    loss = F.cross_entropy(scores, gold)
    if not symmetric:
        return loss
    return (loss + F.cross_entropy(scores[:, :len(positives)].T, gold)) / 2  # (B, B): positive i picks query i


def ranks(sim: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """1-based rank of candidate gold[i] in row i of sim (Q, C), descending, ties broken by candidate order."""
    g = sim.gather(1, gold[:, None])  # (Q, 1)
    cols = torch.arange(sim.shape[1], device=sim.device)[None, :]  # (1, C)
    ahead = (sim > g) | ((sim == g) & (cols < gold[:, None]))
    return ahead.sum(dim=1) + 1


def metrics(sim: torch.Tensor, gold: torch.Tensor | None = None) -> dict[str, float]:
    """recall@1, recall@10 and MRR@10 of queries (rows of sim) whose positive is candidate gold[i]
    (default: i, the diagonal)."""
    if gold is None:
        gold = torch.arange(sim.shape[0])
    r = ranks(sim, gold).double()
    return {"recall@1": (r <= 1).double().mean().item(),
            "recall@10": (r <= 10).double().mean().item(),
            "mrr@10": torch.where(r <= 10, 1.0 / r, torch.zeros_like(r)).mean().item()}


def summary(adapter: dict[str, float], backbone: dict[str, float] | None = None) -> str:
    """`recall@1: 0.xxx (backbone 0.yyy) recall@10: ... mrr@10: ...` (the line `hpeft train` ends with)."""
    parts = []
    for k in METRICS:
        base = f" (backbone {backbone[k]:.3f})" if backbone else ""
        parts.append(f"{k}: {adapter[k]:.3f}{base}")
    return " ".join(parts)


def validation_carve(data: PairDataset, n: int) -> PairDataset:
    """For tuning: data with its last n training pairs (the pool is already shuffled) as the evaluation pairs
    and the rest as training; data.test (the held-out set) is dropped, so nothing tuned on it."""
    if not 0 < n < len(data.train):
        raise DataError(f"a validation carve of {n} pairs needs 1..{len(data.train) - 1} of the "
                        f"{len(data.train)} training pairs")
    return PairDataset(data.name, data.train[:-n], data.train[-n:])
