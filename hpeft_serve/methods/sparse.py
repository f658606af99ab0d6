"""SparseAdapter pruning at initialisation (He et al., Findings of EMNLP 2022).

Scores for every adapter weight (not biases), one global threshold over all of them, then the mask is
fixed: pruned weights are set to zero and `DenseProj` multiplies by the mask in every forward, so their
gradient is zero and they stay exactly zero through any number of training steps.
Scores: rand (random), mag |w|, snip |g * w|, grasp (H g) * w (keep the top-k, as the official code).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .bottleneck import DenseProj


def _scores(pruner: str, projs: list[DenseProj], loss_fn: Callable[[], torch.Tensor] | None,
            generator: torch.Generator) -> list[torch.Tensor]:
    ws = [p.weight for p in projs]
    if pruner == "rand":
        return [torch.rand(w.shape, generator=generator) for w in ws]
    if pruner == "mag":
        return [w.detach().abs() for w in ws]
    if loss_fn is None:
        raise ValueError(f"pruner {pruner!r} needs a batch of training data")
    if pruner == "snip":
        grads = torch.autograd.grad(loss_fn(), ws)
        return [(g * w).detach().abs() for g, w in zip(grads, ws)]
    # grasp: Hessian-gradient product by double back-propagation
    g0 = [g.detach() for g in torch.autograd.grad(loss_fn(), ws)]
    g1 = torch.autograd.grad(loss_fn(), ws, create_graph=True)
    z = sum((a * b).sum() for a, b in zip(g1, g0))
    hg = torch.autograd.grad(z, ws)
    return [(h * w).detach() for h, w in zip(hg, ws)]


@torch.no_grad()
def _apply_masks(projs: list[DenseProj], scores: list[torch.Tensor], sparsity: float) -> None:
    flat = torch.cat([s.flatten() for s in scores])
    keep = flat.numel() - math.ceil(sparsity * flat.numel())  # global: the same threshold for every matrix
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:keep]] = True
    start = 0
    for p, s in zip(projs, scores):
        m = mask[start:start + s.numel()].view_as(s)
        start += s.numel()
        p.sparse_mask.copy_(m)
        p.weight.mul_(m)


def prune(projs: list[DenseProj], pruner: str, sparsity: float, loss_fn: Callable[[], torch.Tensor] | None = None,
          seed: int = 0) -> None:
    """Prune the weights of `projs` to `sparsity` (fraction of zeros) with one global threshold."""
    if not projs or sparsity <= 0:
        return
    with torch.enable_grad():
        scores = _scores(pruner, projs, loss_fn, torch.Generator().manual_seed(seed))
    _apply_masks(projs, scores, sparsity)
