"""(IA)^3 (Liu et al., NeurIPS 2022; peft's `ia3`): learned per-channel rescaling of frozen projections.
k and v (and q, ffn_in when chosen) are scaled on their output, bias included (peft's non-feedforward
modules); ffn_out (and o) on their input, so the FFN's intermediate activation is rescaled (peft's
feedforward modules). Ones at the start: a new adapter changes nothing. The scale applies to the frozen
projection (and its BitFit delta) only, not to a LoRA beside it, so merging is exact: W <- W * l (rows or
columns), b <- b * l (output scaling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import IA3_INPUT

DIMS = {"ffn_in": ("d", "f"), "ffn_out": ("f", "d")}  # (in, out); the others d -> d


def scale_dim(t: str) -> str:
    """The size symbol of target t's scaling vector: its input's for o and ffn_out, else its output's."""
    i, o = DIMS.get(t, ("d", "d"))
    return i if t in IA3_INPUT else o


def make_ia3(targets, dims: dict) -> nn.ParameterDict:
    return nn.ParameterDict({t: nn.Parameter(torch.ones(dims[scale_dim(t)])) for t in targets})


def scaled_linear(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  scale: torch.Tensor) -> torch.Tensor:
    """The frozen projection with (IA)^3's scale on its input (o, ffn_out) or output (the others)."""
    if name in IA3_INPUT:
        return F.linear(x * scale, weight, bias)
    return F.linear(x, weight, bias) * scale


@torch.no_grad()
def merge_into(name: str, linear: nn.Linear, scale: torch.Tensor) -> None:
    """Fold the scale into the frozen projection (in place)."""
    if name in IA3_INPUT:
        linear.weight.mul_(scale.unsqueeze(0))
    else:
        linear.weight.mul_(scale.unsqueeze(1))
        if linear.bias is not None:
            linear.bias.mul_(scale)
