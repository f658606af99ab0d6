"""The shared-backbone model: ONE frozen encoder whose adapter tensors are inputs, stacked per adapter
[K, ...] (a bank, exporters/layout.py), with a per-row adapter index, so one graph serves any adapter and
batches that mix adapters.

`BankedLayer` implements the encoder's LayerHooks with each row's own adapter weights, calling the same
functions as the PyTorch modules (hpeft_serve.methods.functional); flags (0/1) select per row what the
modules select by their configuration, and 0/1 mixing is exact in floating point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpeft_serve.encoder import Encoder, LayerContext
from hpeft_serve.methods import functional as Fn

from .layout import ACTS, spec

BANK_NAMES = tuple(spec())
ROW_AXIS_1 = ("phm_rule",)  # per-row tensors that need a broadcast axis for the sequence


def _col(t: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1): a per-row scalar that broadcasts over (B, S, C)."""
    return t.reshape(-1, 1, 1)


class BankedLayer:
    """LayerHooks for layer i, reading per-row weights `g[name]` of shape (B, L, ...)."""

    def __init__(self, g: dict[str, torch.Tensor], i: int):
        self.g, self.i = g, i

    def w(self, name: str) -> torch.Tensor:
        return self.g[name][:, self.i]

    def _coef(self, p: str, x: torch.Tensor, ctx: LayerContext, otherwise: torch.Tensor) -> torch.Tensor:
        """Per row: the gate value where gated, else `otherwise` (B, 1, 1)."""
        gated = _col(self.w(f"{p}_gated"))
        tm = ctx.shared["gate_token_mask"]
        g = Fn.gate(x, self.w(f"{p}_gate_w"), self.w(f"{p}_gate_b").unsqueeze(1), tm)
        return gated * g + (1.0 - gated) * otherwise

    def linear(self, name, x, layer, ctx):
        y = F.linear(x, layer.weight, layer.bias) + self.w(f"bitfit_{name}").unsqueeze(1)
        delta = Fn.lora_delta(x, self.w(f"lora_{name}_A"), self.w(f"lora_{name}_B"))
        return y + delta * self._coef(f"lora_{name}", x, ctx, _col(self.w(f"lora_{name}_scale")))

    def layer_norm(self, name, x, ln):
        b = ln.bias + self.w(f"bitfit_{name}").unsqueeze(1)
        return F.layer_norm(x, ln.normalized_shape, ln.weight, None, ln.eps) + b

    def prefix(self, x, ctx):
        coef = self._coef("prefix", x, ctx, torch.ones_like(_col(self.w("prefix_gated"))))
        return coef * self.w("prefix_k"), coef * self.w("prefix_v"), self.w("prefix_mask")

    def _act(self, p: str, h: torch.Tensor) -> torch.Tensor:
        onehot = self.w(f"{p}_act")  # (B, len(ACTS))
        return sum(_col(onehot[:, j]) * Fn.ACTIVATIONS[a](h) for j, a in enumerate(ACTS))

    def _finish(self, p: str, up: torch.Tensor, x: torch.Tensor, ctx) -> torch.Tensor:
        scale = _col(self.w(f"{p}_scale"))
        return up * scale * self._coef(p, x, ctx, torch.ones_like(scale))

    def _dense(self, p: str, x: torch.Tensor, ctx) -> torch.Tensor:
        h = self._act(p, Fn.linear(x, self.w(f"{p}_down_w"), self.w(f"{p}_down_b").unsqueeze(1)))
        return self._finish(p, Fn.linear(h, self.w(f"{p}_up_w"), self.w(f"{p}_up_b").unsqueeze(1)), x, ctx)

    def _phm(self, p: str, x: torch.Tensor, ctx) -> torch.Tensor:
        rule = ctx.shared["phm_rule"]  # (B, 1, n, n, n)
        b = x.shape[0]
        down = Fn.phm_linear(x, rule, self.w(f"{p}_down_Wl").unsqueeze(1), self.w(f"{p}_down_Wr").unsqueeze(1), None)
        h = self._act(p, down + self.w(f"{p}_down_b").reshape(b, 1, -1))
        up = Fn.phm_linear(h, rule, self.w(f"{p}_up_Wl").unsqueeze(1), self.w(f"{p}_up_Wr").unsqueeze(1), None)
        return self._finish(p, up + self.w(f"{p}_up_b").unsqueeze(1), x, ctx)

    def residual(self, site, h, a, ln, ctx):
        ln_before = _col(self.w(f"seq_{site}_ln_before"))
        x_a = ln_before * self.layer_norm(f"{site}_ln", h + a, ln) + (1.0 - ln_before) * h
        seq = self._dense(f"seq_{site}", x_a, ctx) + self._phm(f"phm_{site}", x_a, ctx)
        out = seq + h + a + self._dense(f"par_{site}", a, ctx)
        return self.layer_norm(f"{site}_ln", out, ln)


class _Banked:
    """What the encoder asks of an adapter set, for one forward of a banked batch."""

    def __init__(self, g: dict[str, torch.Tensor], token_mask: torch.Tensor, num_layers: int):
        gm = _col(g["gate_masked"])
        shared = {"phm_rule": g["phm_rule"].unsqueeze(1), "gate_token_mask": gm * token_mask + (1.0 - gm)}
        self._shared = [shared] * num_layers
        self.layers = [BankedLayer(g, i) for i in range(num_layers)]

    def shared_tensors(self):
        return self._shared


class SharedModel(nn.Module):
    """logits (B, C) = head_row(encoder(input_ids, attention_mask; bank rows adapter_index))."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder.eval()
        self.encoder.requires_grad_(False)

    def forward(self, input_ids, attention_mask, adapter_index, *bank: torch.Tensor) -> torch.Tensor:
        g = {name: t.index_select(0, adapter_index) for name, t in zip(BANK_NAMES, bank)}  # (B, ...)
        token_mask = attention_mask.to(torch.float32).unsqueeze(-1)
        h = self.encoder(input_ids, attention_mask, _Banked(g, token_mask, len(self.encoder.layers)))
        cls = _col(g["head_cls"]).squeeze(-1)  # (B, 1)
        pooled = cls * h[:, 0] + (1.0 - cls) * Fn.token_mean(h, token_mask).squeeze(1)  # (B, D)
        x = torch.tanh(Fn.linear(pooled.unsqueeze(1), g["head_dense_w"], g["head_dense_b"].unsqueeze(1)))
        return Fn.linear(x, g["head_out_w"], g["head_out_b"].unsqueeze(1)).squeeze(1)

    def run(self, input_ids, attention_mask, adapter_index, bank: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(input_ids, attention_mask, adapter_index, *(bank[n] for n in BANK_NAMES))
