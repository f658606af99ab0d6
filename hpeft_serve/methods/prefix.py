"""Prefix tuning (Li & Liang, 2021): learned key/value vectors prepended in every adapted layer.

In training the vectors come from an MLP over a small embedding (the reparametrisation); `eject()`
evaluates it once and keeps only the vectors (prefix_kv), exactly the tensor the MLP gave.
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixPool(nn.Module):
    """Prefix key/value vectors for `n_layers` adapted layers: (n_layers, 2, length, d)."""

    def __init__(self, n_layers: int, length: int, d: int, bottleneck: int, dropout: float = 0.0):
        super().__init__()
        self.n_layers, self.length, self.d = n_layers, length, d
        self.dropout = nn.Dropout(dropout)
        if bottleneck > 0:
            self.prefix_wte = nn.Embedding(length, d)
            self.prefix_mlp = nn.Sequential(nn.Linear(d, bottleneck), nn.Tanh(), nn.Linear(bottleneck, n_layers * 2 * d))
            self.prefix_kv = None
        else:
            self.prefix_kv = nn.Parameter(torch.randn(n_layers, 2, length, d) * 0.02)

    @property
    def ejected(self) -> bool:
        return self.prefix_kv is not None

    def forward(self) -> torch.Tensor:
        if self.prefix_kv is not None:
            return self.prefix_kv
        h = self.prefix_mlp(self.prefix_wte.weight)  # (length, n_layers*2*d)
        kv = h.view(self.length, self.n_layers, 2, self.d).permute(1, 2, 0, 3)  # (n_layers, 2, length, d)
        return self.dropout(kv)

    @torch.no_grad()
    def eject(self) -> None:
        """Replace the MLP by the vectors it computes (exact: the same tensor, no dropout)."""
        if self.prefix_kv is not None:
            return
        was = self.training
        self.eval()
        kv = self.forward().detach().clone()
        self.train(was)
        del self.prefix_mlp, self.prefix_wte
        self.prefix_kv = nn.Parameter(kv)
