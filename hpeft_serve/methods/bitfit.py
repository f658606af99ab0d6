"""BitFit (Ben Zaken et al., ACL 2022): train the biases. Kept as deltas added to the frozen biases, so the
backbone stays shared and a BitFit adapter is a small pack like any other."""

from __future__ import annotations

import torch
from torch import nn

from .config import BIAS_NAMES


def make_bitfit(d: int, d_ffn: int) -> nn.ParameterDict:
    """Zero bias deltas for every bias of one layer (zero: a new adapter changes nothing)."""
    return nn.ParameterDict({n: nn.Parameter(torch.zeros(d_ffn if n == "ffn_in" else d)) for n in BIAS_NAMES})
