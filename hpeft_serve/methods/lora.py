"""LoRA (Hu et al., 2021): a low-rank update B A beside a frozen projection, scaled by alpha / r.
With a UniPELT gate the gate value replaces alpha / r (as in the original code and AdapterHub)."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as Fn
from .gate import Gate


class LoRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, gate: bool = False, masked_gate: bool = True,
                 rslora: bool = False):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, d_in))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))  # zero: a new adapter changes nothing
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r  # rsLoRA: alpha / sqrt(r)
        self.gate = Gate(d_in, masked=masked_gate) if gate else None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        delta = Fn.lora_delta(x, self.lora_A, self.lora_B)
        if self.gate is not None:
            return delta * self.gate(x, token_mask)
        return delta * self.scaling

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W + scaling * B A (only without a gate: a gate depends on the input)."""
        if self.gate is not None:
            raise ValueError("a gated LoRA cannot be merged into the weight: its gate depends on the input")
        return weight + self.scaling * (self.lora_B @ self.lora_A)
