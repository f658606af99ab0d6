"""The UniPELT gate (Mao et al., ACL 2022): a learned sigmoid that scales one adapter branch per example."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as Fn


class Gate(nn.Module):
    """g = mean_t sigmoid(gate_weight x_t + gate_bias), (B, 1, C); C = 1 (or 2 for separate prefix K/V gates)."""

    def __init__(self, d: int, outputs: int = 1, masked: bool = True):
        super().__init__()
        self.gate_weight = nn.Parameter(torch.randn(outputs, d) * 0.02)  # BERT init, as AdapterHub
        self.gate_bias = nn.Parameter(torch.zeros(outputs))
        self.masked = masked

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        return Fn.gate(x, self.gate_weight, self.gate_bias, token_mask if self.masked else None)
