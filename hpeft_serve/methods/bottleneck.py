"""Bottleneck adapters: down-projection, activation, up-projection, scaled (and optionally gated).

- sequential (Houlsby et al. 2019 / Pfeiffer et al. 2021): on the sub-layer output h; with ln_before the
  input is the frozen LayerNorm(h + x) (AdapterHub's SeqBn, the same LayerNorm applied twice).
- parallel (He et al., ICLR 2022): on the sub-layer input x, added beside the sub-layer (MAM: scaling 4).
The projections are dense, dense under a fixed sparse mask (SparseAdapter, He et al. 2022), or PHM layers
sharing one rule across all layers (Compacter, Karimi Mahabadi et al. 2021).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as Fn
from .config import BottleneckConfig
from .gate import Gate


class DenseProj(nn.Module):
    """y = x (W * M)^T + b; the mask M (SparseAdapter) is fixed after pruning and saved with the weights."""

    def __init__(self, d_in: int, d_out: int, sparse: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))
        if sparse:
            self.register_buffer("sparse_mask", torch.ones(d_out, d_in, dtype=torch.bool))
        else:
            self.sparse_mask = None

    def masked_weight(self) -> torch.Tensor:
        return self.weight if self.sparse_mask is None else self.weight * self.sparse_mask

    def forward(self, x: torch.Tensor, rule: torch.Tensor | None = None) -> torch.Tensor:
        if self.sparse_mask is not None and torch.onnx.is_in_onnx_export() and hasattr(self, "sparse_values"):
            # ONNX export: hpeft::SparseLinear with the non-zeros stored compactly (exporters/ops.py)
            return torch.ops.hpeft.sparse_linear(x, self.sparse_values, self.sparse_indices, self.sparse_shape,
                                                 self.bias)
        return Fn.linear(x, self.masked_weight(), self.bias)

    @torch.no_grad()
    def prepare_compact_export(self) -> None:
        """Keep the masked weight as (values, flat indices, shape) for hpeft::SparseLinear (export copies only)."""
        w = self.masked_weight().flatten()
        idx = self.sparse_mask.flatten().nonzero().squeeze(1)
        self.register_buffer("sparse_values", w[idx].clone())
        self.register_buffer("sparse_indices", idx.to(torch.int64))
        self.register_buffer("sparse_shape", torch.tensor(self.weight.shape, dtype=torch.int64))


class PHMProj(nn.Module):
    """PHM projection: H = sum_i kron(rule_i, phm_W_left_i @ phm_W_right_i), y = x H + b; rule given per call."""

    def __init__(self, d_in: int, d_out: int, n: int, rank: int):
        super().__init__()
        self.phm_W_left = nn.Parameter(torch.empty(n, d_in // n, rank))
        self.phm_W_right = nn.Parameter(torch.empty(n, rank, d_out // n))
        self.bias = nn.Parameter(torch.zeros(d_out))
        for w in (self.phm_W_left, self.phm_W_right):  # Compacter: glorot-uniform with gain sqrt(2)
            nn.init.xavier_uniform_(w, gain=math.sqrt(2))

    def forward(self, x: torch.Tensor, rule: torch.Tensor | None = None) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # the same math as the custom op hpeft::PHMLinear (exporters/ops.py)
            return torch.ops.hpeft.phm_linear(x, rule, self.phm_W_left, self.phm_W_right, self.bias)
        return Fn.phm_linear(x, rule, self.phm_W_left, self.phm_W_right, self.bias)


class Bottleneck(nn.Module):
    def __init__(self, cfg: BottleneckConfig, d: int, masked_gate: bool = True):
        super().__init__()
        self.cfg = cfg
        r = cfg.width(d)
        if cfg.phm_n:
            n = cfg.phm_n
            if d % n or r % n:
                raise ValueError(f"adapter: hidden size {d} and bottleneck {r} must be multiples of phm_n={n} "
                                 f"(set reduction_factor or bottleneck)")
            self.adapter_down = PHMProj(d, r, n, cfg.phm_rank)
            self.adapter_up = PHMProj(r, d, n, cfg.phm_rank)
        else:
            self.adapter_down = DenseProj(d, r, cfg.sparsity > 0)
            self.adapter_up = DenseProj(r, d, cfg.sparsity > 0)
            self._init_dense(cfg.init)
        self.act = Fn.ACTIVATIONS[cfg.activation]
        self.scaling = cfg.scaling
        self.gate = Gate(d, masked=masked_gate) if cfg.gate else None

    @torch.no_grad()
    def _init_dense(self, init: str) -> None:
        down, up = self.adapter_down.weight, self.adapter_up.weight
        if init == "bert":
            down.normal_(0, 0.02), up.normal_(0, 0.02)
        elif init == "mam":
            nn.init.kaiming_uniform_(down, a=math.sqrt(5)), up.zero_()
        else:  # houlsby
            nn.init.trunc_normal_(down, std=1e-2, a=-2e-2, b=2e-2), nn.init.trunc_normal_(up, std=1e-2, a=-2e-2, b=2e-2)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor, rule: torch.Tensor | None) -> torch.Tensor:
        """The adapter's contribution (without the residual): scaling * gate * up(act(down(x)))."""
        out = self.adapter_up(self.act(self.adapter_down(x, rule)), rule) * self.scaling
        if self.gate is not None:
            out = out * self.gate(x, token_mask)
        return out

    def sparse_projections(self) -> list[DenseProj]:
        return [p for p in (self.adapter_down, self.adapter_up) if getattr(p, "sparse_mask", None) is not None]
