"""The shared-backbone model: ONE frozen encoder whose adapter tensors are inputs, stacked per adapter
[K, ...] (a bank, exporters/layout.py), with a per-row adapter index, so one graph serves any adapter and
batches that mix adapters.

`BankedLayer` implements the encoder's LayerHooks with each row's own adapter weights, calling the same
functions as the PyTorch modules (hpeft_serve.methods.functional); flags (0/1) select per row what the
modules select by their configuration, and 0/1 mixing is exact in floating point. A `Layout` says which
slot kinds the graph has at all: the rest are not computed; PHM adapters get one branch per n (a row's
adapter fills the branch of its n, the others are exact zeros).

Outputs: `logits` (B, C) for every row and, in a graph whose layout has `embeddings`, `embeddings` (B, D):
each row's sentence vector pooled as its pack's flags say (mean, cls, or max over real tokens) and
L2-normalised where head_norm is 1, exactly hpeft_serve.model.pool / EmbeddingHead. A classifier's row gets
the pooled vector its head reads (not normalised); an embedding adapter's row gets float32-min logits (its
head tensors are zeros, its padded logit bias the fill).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpeft_serve.encoder import Encoder, LayerContext
from hpeft_serve.methods import functional as Fn
from hpeft_serve.model import pool

from .layout import ACTS, Layout, bank_feed, input_names


def _col(t: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1): a per-row scalar that broadcasts over (B, S, C)."""
    return t.reshape(-1, 1, 1)


class BankedLayer:
    """LayerHooks for layer i; `bank["name.i"]` is this layer's (K, ...), rows pick their adapter by `index`."""

    def __init__(self, bank: dict[str, torch.Tensor], index: torch.Tensor, i: int, layout: Layout):
        self.bank, self.index, self.i, self.layout = bank, index, i, layout

    def w(self, name: str) -> torch.Tensor:
        return self.bank[f"{name}.{self.i}"].index_select(0, self.index)  # (B, ...): each row's own adapter

    def _coef(self, p: str, x: torch.Tensor, ctx: LayerContext, otherwise: torch.Tensor | None) -> torch.Tensor | None:
        """Per row (B, 1, 1): the gate value where the adapter is gated, else `otherwise`."""
        if p not in self.layout.gated:
            return otherwise
        gated = _col(self.w(f"{p}_gated"))
        g = Fn.gate(x, self.w(f"{p}_gate_w"), self.w(f"{p}_gate_b").unsqueeze(1), ctx.shared["gate_token_mask"])
        return gated * g + (1.0 - gated) * (1.0 if otherwise is None else otherwise)

    def linear(self, name, x, layer, ctx):
        y = F.linear(x, layer.weight, layer.bias)
        if self.layout.bitfit:
            y = y + self.w(f"bitfit_{name}").unsqueeze(1)
        if name in self.layout.lora:
            delta = Fn.lora_delta(x, self.w(f"lora_{name}_A"), self.w(f"lora_{name}_B"))
            y = y + delta * self._coef(f"lora_{name}", x, ctx, _col(self.w(f"lora_{name}_scale")))
        return y

    def layer_norm(self, name, x, ln):
        if not self.layout.bitfit:
            return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        b = ln.bias + self.w(f"bitfit_{name}").unsqueeze(1)
        return F.layer_norm(x, ln.normalized_shape, ln.weight, None, ln.eps) + b

    def prefix(self, x, ctx):
        if not self.layout.prefix:
            return None
        k, v, mask = self.w("prefix_k"), self.w("prefix_v"), self.w("prefix_mask")
        coef = self._coef("prefix", x, ctx, None)
        return (k, v, mask) if coef is None else (coef * k, coef * v, mask)

    def _act(self, p: str, h: torch.Tensor) -> torch.Tensor:
        acts = self.layout.acts
        if len(acts) == 1:  # every adapter of the graph uses it (unused slots are zeros: act(0) = 0)
            return Fn.ACTIVATIONS[acts[0]](h)
        onehot = self.w(f"{p}_act")  # (B, len(ACTS))
        return sum(_col(onehot[:, ACTS.index(a)]) * Fn.ACTIVATIONS[a](h) for a in acts)

    def _finish(self, p: str, up: torch.Tensor, x: torch.Tensor, ctx) -> torch.Tensor:
        out = up * _col(self.w(f"{p}_scale"))
        coef = self._coef(p, x, ctx, None)
        return out if coef is None else out * coef

    def _dense(self, p: str, x: torch.Tensor, ctx) -> torch.Tensor:
        h = self._act(p, Fn.linear(x, self.w(f"{p}_down_w"), self.w(f"{p}_down_b").unsqueeze(1)))
        return self._finish(p, Fn.linear(h, self.w(f"{p}_up_w"), self.w(f"{p}_up_b").unsqueeze(1)), x, ctx)

    def _phm(self, n: int, site: str, x: torch.Tensor, ctx) -> torch.Tensor:
        p, rule = f"phm{n}_{site}", ctx.shared[f"phm{n}_rule"]  # rule (B, 1, n, n, n)
        b = x.shape[0]
        down = Fn.phm_linear(x, rule, self.w(f"{p}_down_Wl").unsqueeze(1), self.w(f"{p}_down_Wr").unsqueeze(1), None)
        h = self._act(p, down + self.w(f"{p}_down_b").reshape(b, 1, -1))
        up = Fn.phm_linear(h, rule, self.w(f"{p}_up_Wl").unsqueeze(1), self.w(f"{p}_up_Wr").unsqueeze(1), None)
        return self._finish(p, up + self.w(f"{p}_up_b").unsqueeze(1), x, ctx)

    def residual(self, site, h, a, ln, ctx):
        lay = self.layout
        out = h + a
        if site in lay.seq or site in lay.phm:
            lnb = _col(self.w(f"seq_{site}_ln_before"))
            x_a = lnb * self.layer_norm(f"{site}_ln", h + a, ln) + (1.0 - lnb) * h
            seq = self._dense(f"seq_{site}", x_a, ctx) if site in lay.seq else None
            for n in lay.phm_n if site in lay.phm else ():  # one branch per n: a row's other-n branches are 0
                phm = self._phm(n, site, x_a, ctx)
                seq = phm if seq is None else seq + phm
            out = seq + h + a
        if site in lay.par:
            out = out + self._dense(f"par_{site}", a, ctx)
        return self.layer_norm(f"{site}_ln", out, ln)


class _Banked:
    """What the encoder asks of an adapter set, for one forward of a banked batch."""

    def __init__(self, bank: dict, index: torch.Tensor, token_mask: torch.Tensor, layout: Layout, num_layers: int):
        shared: dict = {}
        if layout.gated:
            gm = _col(bank["gate_masked"].index_select(0, index))
            shared["gate_token_mask"] = gm * token_mask + (1.0 - gm)
        for n in layout.phm_n:
            shared[f"phm{n}_rule"] = bank[f"phm{n}_rule"].index_select(0, index).unsqueeze(1)
        self._shared = [shared] * num_layers
        self.layers = [BankedLayer(bank, index, i, layout) for i in range(num_layers)]

    def shared_tensors(self):
        return self._shared


class SharedModel(nn.Module):
    """logits (B, C) = head_row(encoder(input_ids, attention_mask; bank rows adapter_index)), and with
    layout.embeddings also embeddings (B, D) = the row's pooled (and maybe normalised) vector."""

    def __init__(self, encoder: Encoder, layout: Layout):
        super().__init__()
        self.encoder = encoder.eval()
        self.encoder.requires_grad_(False)
        self.layout = layout
        self.input_names = tuple(input_names(layout, len(encoder.layers)))

    def forward(self, input_ids, attention_mask, adapter_index, *bank: torch.Tensor):
        b = dict(zip(self.input_names, bank))
        token_mask = attention_mask.to(torch.float32).unsqueeze(-1)
        banked = _Banked(b, adapter_index, token_mask, self.layout, len(self.encoder.layers))
        h = self.encoder(input_ids, attention_mask, banked)
        row = lambda n: b[n].index_select(0, adapter_index)  # noqa: E731
        cls = row("head_cls").unsqueeze(-1)  # (B, 1)
        pooled = cls * h[:, 0] + (1.0 - cls) * Fn.token_mean(h, token_mask).squeeze(1)  # (B, D)
        x = torch.tanh(Fn.linear(pooled.unsqueeze(1), row("head_dense_w"), row("head_dense_b").unsqueeze(1)))
        logits = Fn.linear(x, row("head_out_w"), row("head_out_b").unsqueeze(1)).squeeze(1)
        if not self.layout.embeddings:
            return logits
        mx, norm = row("head_max").unsqueeze(-1), row("head_norm").unsqueeze(-1)  # (B, 1) each
        emb = mx * pool(h, attention_mask, "max") + (1.0 - mx) * pooled  # (B, D)
        return logits, norm * F.normalize(emb, p=2.0, dim=-1) + (1.0 - norm) * emb

    def run(self, input_ids, attention_mask, adapter_index, bank: dict[str, torch.Tensor]):
        """Run on a stacked bank (exporters.layout.stack): logits, or (logits, embeddings)."""
        feed = bank_feed(bank, self.layout)
        return self(input_ids, attention_mask, adapter_index, *(feed[n] for n in self.input_names))
