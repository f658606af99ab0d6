"""The shared-backbone model: ONE frozen encoder whose adapter tensors are inputs, stacked per adapter
[K, ...] (a bank, exporters/layout.py), with a per-row adapter index, so one graph serves any adapter and
batches that mix adapters.

`BankedLayer` implements the encoder's LayerHooks with each row's own adapter weights, calling the same
functions as the PyTorch modules (hpeft_serve.methods.functional); each hook runs the registered slot kinds
that implement it (hpeft_serve/slots: a kind's banked forward is its module's), in the PyTorch order; flags (0/1) select per row what the
modules select by their configuration, and 0/1 mixing is exact in floating point. A `Layout` says which
slot kinds the graph has at all: the rest are not computed; PHM adapters get one branch per n (a row's
adapter fills the branch of its n, the others are exact zeros).

Row-segmented (exporters/segment.py): each slot kind (LoRA per projection, the prefix gate, the sequential,
PHM and parallel adapter of a site) runs only for the rows whose adapter uses it in this layer (a non-zero
scale or gate flag; for the prefix, an unmasked position), the rows gathered and written back. Which rows
use which (kind, layer) is worked out once per forward (`_Banked`: one (K, N) usage matrix over every kind
and layer, one Gather by the rows, one reduction to all/any flags); each kind then costs an `If` on its
flag, two for a kind no row uses. The prefix widens attention by the positions some row of the batch unmasks
(none: by nothing), in the rows that have a prefix in the layer only (segment.prefix_attention). BitFit deltas
ride in the projections' biases; a layer where no row has one runs the frozen module's ops (build_choices).

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
from hpeft_serve.methods.config import BIAS_NAMES
from hpeft_serve.model import pool

from hpeft_serve.pack.layout import NEG
from hpeft_serve.slots.registry import KINDS, implementing, ln_bias_inputs

from .layout import ACTS, Layout, bank_feed, input_names, per_layer
from .segment import Choice, Kind, Usage


def _col(t: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1): a per-row scalar that broadcasts over (B, S, C)."""
    return t.reshape(-1, 1, 1)


class Rows:
    """The adapter weights of some rows of one layer: `w(name)` is bank tensor `name` ([K, ...]) gathered by
    `index` (R,) -> (R, ...); `tmask` (R, S, 1) the gates' token weights, the token mask over its count
    (None: the layout has no gate)."""

    def __init__(self, bank: dict[str, torch.Tensor], index: torch.Tensor, layout: Layout,
                 tmask: torch.Tensor | None = None):
        self.bank, self.index, self.layout, self.tmask = bank, index, layout, tmask
        self._i2: torch.Tensor | None = None
        self._i3: torch.Tensor | None = None

    def w(self, name: str) -> torch.Tensor:
        return self.bank[name].index_select(0, self.index)

    def w1(self, name: str) -> torch.Tensor:
        """w(name).unsqueeze(1) in one Gather: (R, 1, ...), a per-row bias or scalar that broadcasts over S."""
        if self._i2 is None:
            self._i2 = self.index.unsqueeze(1)
        return self.bank[name][self._i2]

    def col(self, name: str) -> torch.Tensor:
        """A per-row scalar (K,) as (R, 1, 1), in one Gather."""
        if self._i3 is None:
            self._i3 = self.index.reshape(-1, 1, 1)
        return self.bank[name][self._i3]

    def coef(self, p: str, x: torch.Tensor, otherwise: torch.Tensor | None) -> torch.Tensor | None:
        """Per row (R, 1, 1): the gate value where the adapter is gated, else `otherwise` (a Where: exact).
        The gate is Fn.gate's masked mean with the division by the token count done once per forward."""
        if p not in self.layout.gated:
            return otherwise
        gated = self.col(f"{p}_gated")
        g = (torch.sigmoid(Fn.linear(x, self.w(f"{p}_gate_w"), self.w1(f"{p}_gate_b"))) * self.tmask).sum(
            dim=1, keepdim=True)
        return torch.where(gated > 0.5, g, 1.0 if otherwise is None else otherwise)

    def layer_norm(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        """LayerNorm `name` with each row's bias deltas (the kinds' ln_bias_inputs: BitFit's)."""
        deltas = ln_bias_inputs(self.layout, name)
        if not deltas:
            return F.layer_norm(x, weight.shape, weight, bias, eps)
        for n in deltas:
            bias = bias + self.w1(n)
        return F.layer_norm(x, weight.shape, weight, None, eps) + bias

    def act(self, p: str, h: torch.Tensor) -> torch.Tensor:
        acts = self.layout.acts
        if len(acts) == 1:  # every adapter of the graph uses it (unused slots are zeros: act(0) = 0)
            return Fn.ACTIVATIONS[acts[0]](h)
        onehot = self.w(f"{p}_act")  # (R, len(ACTS))
        return sum(_col(onehot[:, ACTS.index(a)]) * Fn.ACTIVATIONS[a](h) for a in acts)

    def out_scale(self, p: str, x: torch.Tensor) -> torch.Tensor:
        """A bottleneck's output factor per row (R, 1, 1): its scale, times the gate where gated."""
        scale = self.col(f"{p}_scale")
        coef = self.coef(p, x, None)
        return scale if coef is None else scale * coef

    def dense(self, p: str, x: torch.Tensor) -> torch.Tensor:
        """up(act(down(x))) * out_scale, the factor applied on the bottleneck (R, S, W) and the up bias
        (R, 1, d): the same math with no Mul over the (R, S, d) output (onnxruntime: two fewer full-width
        passes per kind)."""
        c = self.out_scale(p, x)
        h = self.act(p, Fn.linear(x, self.w(f"{p}_down_w"), self.w1(f"{p}_down_b"))) * c
        return Fn.linear(h, self.w(f"{p}_up_w"), self.w1(f"{p}_up_b") * c)

    def phm(self, p: str, n: int, x: torch.Tensor) -> torch.Tensor:
        """The PHM branch with each row's H formed (a bottleneck's H is small: d x n*O), then a batched
        MatMul: at these widths far cheaper than contracting x with the factors (bench/export.py); the
        output factor on the bottleneck, as in `dense`."""
        rule = self.w(f"phm{n}_rule")  # (R, n, n, n)
        b = x.shape[0]
        c = self.out_scale(p, x)
        down = x @ _phm_weight(rule, self.w(f"{p}_down_Wl"), self.w(f"{p}_down_Wr"))  # (R, S, n*O)
        h = self.act(p, down + self.w(f"{p}_down_b").reshape(b, 1, -1)) * c
        up = h @ _phm_weight(rule, self.w(f"{p}_up_Wl"), self.w(f"{p}_up_Wr"))  # (R, S, d)
        return up + self.w1(f"{p}_up_b") * c


def _phm_weight(rule: torch.Tensor, W_left: torch.Tensor, W_right: torch.Tensor) -> torch.Tensor:
    """Fn.phm_weight per row: H (R, n*I, n*O) = sum_i kron(rule_i, W_left_i @ W_right_i) for rule (R, n, n, n),
    W_left (R, n, I, r), W_right (R, n, r, O)."""
    B = W_left @ W_right  # (R, n, I, O)
    H = torch.einsum("bijp,bikq->bjkpq", rule, B)  # (R, n(j), I, n(p), O)
    return H.reshape(H.shape[0], H.shape[1] * H.shape[2], H.shape[3] * H.shape[4])


# ---------------------------------------------------------------- the kinds: fn(base, *xs, index, ws)
class _Example:
    """What a kind's example inputs are made of (build_kinds): rand(*shape), dim {"d", "f"}, tm the gates'
    token weights ([] without gates), gm(p) tm where p is gated, ln a LayerNorm's (weight, bias), eps."""

    def __init__(self, layout: Layout, d: int, f: int, eps: float):
        g = torch.Generator().manual_seed(0)
        self.rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        self.dim, self.eps = {"d": d, "f": f}, eps
        self.tm = [torch.ones(2, 3, 1)] if layout.gated else []
        self.gm = lambda p: self.tm if p in layout.gated else []  # noqa: E731
        self.ln = [self.rand(d), self.rand(d)]


def build_kinds(layout: Layout, d: int, f: int, eps: float) -> dict[str, Kind]:
    """Every segmented kind the layout has (each registered slot kind's, hpeft_serve/slots), traced on an
    example bank of layer 0 (sizes 2 rows, 3 tokens)."""
    from .export import example_bank  # exporters.export imports this module
    bank = {n: (t[:, 0] if per_layer(n) else t) for n, t in example_bank(1, d, f, layout, k=4).items()}
    ex, index = _Example(layout, d, f, eps), torch.tensor([1, 3])
    kinds = {}
    for slot in KINDS:
        for key, fn, names, xs, *extra in slot.kinds(layout, ex):
            ws = [bank[n] for n in names] + list(extra[0] if extra else ())
            kinds[key] = Kind(fn, names, (xs[0], *xs[1:], index, ws))
    return kinds


def build_choices(layout: Layout, d: int, f: int, eps: float, act) -> dict[str, Choice]:
    """BitFit's per-layer If (a layer where no row of the batch has a bias delta runs the frozen module's
    ops): the FFN's input projection with its activation `act` (unless LoRA or (IA)^3 also change that
    projection's output), and the sub-layers' LayerNorms."""
    if not layout.bitfit or [k.name for k in implementing("layer_norm_bias")] != ["bitfit"]:
        return {}  # (a LayerNorm's If would skip another kind's bias)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    out = {"ln": Choice(lambda x, w, b: F.layer_norm(x, (d,), w, b, eps),
                        lambda x, w, b, dl: F.layer_norm(x, (d,), w, None, eps) + (b + dl),
                        (r(2, 3, d), r(d), r(d), r(2, 1, d)))}
    if "ffn_in" not in layout.lora and "ffn_in" not in layout.ia3:
        # w is the weight transposed (in, out) outside the If: one MatMul weight both branches share
        out["ffn_in"] = Choice(lambda x, w, b: act(x @ w + b), lambda x, w, b, dl: act(x @ w + (b + dl)),
                               (r(2, 3, d), r(d, f), r(f), r(2, 1, f)))
    return out


# ---------------------------------------------------------------- the layer hooks
class BankedLayer:
    """LayerHooks for layer i; `bank["name.i"]` is this layer's (K, ...), rows pick their adapter by `index`."""

    def __init__(self, bank: dict[str, torch.Tensor], index: torch.Tensor, i: int, layout: Layout,
                 kinds: dict[str, Kind], index2: torch.Tensor, usage: Usage):
        self.bank, self.index, self.i, self.layout, self.kinds, self.index2 = bank, index, i, layout, kinds, index2
        self.usage = usage
        self.choices: dict[str, Choice] = {}  # build_choices'

    def t(self, name: str) -> torch.Tensor:
        """This layer's bank tensor `name` [K, ...]."""
        return self.bank[f"{name}.{self.i}"] if per_layer(name) else self.bank[name]

    def w(self, name: str) -> torch.Tensor:
        return self.t(name).index_select(0, self.index)  # (B, ...): each row's own adapter

    def register(self, usage: Usage) -> None:
        """This layer's columns of the usage matrix: per adapter, non-zero exactly where its kind p adds
        something here (a non-zero scale or gate flag; the prefix gate: an unmasked prefix position)."""
        if self.layout.bitfit:  # any bias delta in this layer
            usage.add(f"bitfit.{self.i}", sum(self.t(f"bitfit_{b}").abs().sum(dim=1) for b in BIAS_NAMES))
        if self.layout.prefix:  # the prefix's attention and its gate
            usage.add(f"prefix.{self.i}", (self.t("prefix_mask") > 0.5 * NEG).sum(dim=1).float())
        for p in self.kinds:
            if p != "prefix":
                usage.add(f"{p}.{self.i}", self.t(f"{p}_scale"),
                          self.t(f"{p}_gated") if p in self.layout.gated else None)

    def _run(self, p: str, base: torch.Tensor, xs: list, ctx: LayerContext, extra=()):
        kind = self.kinds[p]
        ws = [self.t(n) for n in kind.names] + list(extra)
        if xs[0].shape[0] != self.index.shape[0]:  # not the batch's rows (DeBERTa's relative embeddings)
            if p in self.layout.gated:  # its own context's token mask (every position), as weights
                m = ctx.shared["gate_token_mask"]
                xs = xs + [m / m.sum(dim=1, keepdim=True).clamp_min(1.0)]
            return kind.everywhere(base, xs, self.index, ws)
        xs = xs + ([ctx.shared["gate_token_weight"]] if p in self.layout.gated else [])
        return kind(base, self.usage, f"{p}.{self.i}", xs, self.index, ws)

    # each hook runs the registered slot kinds that implement it, in the PyTorch modules' order
    def linear(self, name, x, layer, ctx):
        bias = layer.bias
        for k in _HOOKS["linear_bias"]:  # BitFit: the row's delta in the bias
            bias = k.linear_bias(self, name, bias)
        x_in = x
        for k in _HOOKS["linear_input"]:  # (IA)^3 on the input
            x_in = k.linear_input(self, name, x_in)
        y = F.linear(x_in, layer.weight) + bias
        for k in _HOOKS["linear_output"]:  # (IA)^3 on the output
            y = k.linear_output(self, name, y)
        for k in _HOOKS["linear_add"]:  # LoRA
            y = k.linear_add(self, name, y, x, ctx)
        return y

    def _bitfit(self, choice: str, name: str, x, w, b):
        delta = self.t(f"bitfit_{name}")[self.index2]  # (B, 1, out)
        return self.choices[choice].run(self.usage.some[self.usage.col[f"bitfit.{self.i}"]], x, w, b, delta)

    def linear_act(self, name, x, layer, act, ctx):
        if name in self.choices:  # BitFit alone changes it: its per-layer If
            return self._bitfit(name, name, x, layer.weight.t(), layer.bias)
        return act(self.linear(name, x, layer, ctx))

    def layer_norm(self, name, x, ln):
        if "ln" in self.choices:
            return self._bitfit("ln", name, x, ln.weight, ln.bias)
        b = ln.bias
        for k in _HOOKS["layer_norm_bias"]:
            b = k.layer_norm_bias(self, name, b)
        if b is ln.bias:
            return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        return F.layer_norm(x, ln.normalized_shape, ln.weight, None, ln.eps) + b

    def prefix(self, x, ctx):
        for k in _HOOKS["prefix"]:
            got = k.prefix(self, x, ctx)
            if got is not None:
                return got
        return None

    def prefix_attention(self, q, k, v, pre, mask_add, scale):
        for k_ in _HOOKS["prefix_attention"]:
            got = k_.prefix_attention(self, q, k, v, pre, mask_add, scale)
            if got is not None:
                return got
        return None

    def residual(self, site, h, a, ln, ctx):
        out = h + a
        for k in _RESIDUAL:  # sequential, its branches, parallel
            out = k.residual(self, site, out, h, a, ln, ctx)
        return self.layer_norm(f"{site}_ln", out, ln)


_HOOKS = {h: implementing(h) for h in ("linear_bias", "linear_input", "linear_output", "linear_add",
                                         "layer_norm_bias", "prefix", "prefix_attention")}
_RESIDUAL = sorted(implementing("residual"), key=lambda k: k.RESIDUAL)


class _Banked:
    """What the encoder asks of an adapter set, for one forward of a banked batch."""

    def __init__(self, bank: dict, index: torch.Tensor, token_mask: torch.Tensor, layout: Layout, num_layers: int,
                 kinds: dict[str, Kind], choices: dict[str, Choice]):
        shared: dict = {}
        if layout.gated:
            gm = _col(bank["gate_masked"].index_select(0, index))
            shared["gate_token_mask"] = m = gm * token_mask + (1.0 - gm)  # (B, S, 1): the tokens a gate averages
            shared["gate_token_weight"] = m / m.sum(dim=1, keepdim=True).clamp_min(1.0)  # the mean's weights, once
        self._shared = [shared] * num_layers
        index2 = index.unsqueeze(1)  # (B, 1): gathers a per-row bias as (B, 1, D) in one node
        usage = Usage()  # which rows use each (kind, layer): once for the whole forward
        self.layers = [BankedLayer(bank, index, i, layout, kinds, index2, usage) for i in range(num_layers)]
        for layer in self.layers:
            layer.choices = choices
            layer.register(usage)
        usage.done(index)

    def shared_tensors(self):
        return self._shared


class SharedModel(nn.Module):
    """logits (B, C) = head_row(encoder(input_ids, attention_mask; bank rows adapter_index)), and with
    layout.embeddings also embeddings (B, D) = the row's pooled (and maybe normalised) vector."""

    def __init__(self, encoder: Encoder, layout: Layout, bitfit_if: bool = True):
        """`bitfit_if`: BitFit's per-layer If (build_choices); without it a BitFit layout adds each row's
        delta in every layer (what an int8 export takes: its projections stay in the top-level graph)."""
        super().__init__()
        self.encoder = encoder.eval()
        self.encoder.requires_grad_(False)
        self.layout = layout
        self.input_names = tuple(input_names(layout, len(encoder.layers)))
        c = encoder.config
        self.kinds = build_kinds(layout, c.hidden_size, c.intermediate_size, c.layer_norm_eps)
        self.choices = build_choices(layout, c.hidden_size, c.intermediate_size, c.layer_norm_eps,
                                     encoder.layers[0].act) if bitfit_if else {}

    def forward(self, input_ids, attention_mask, adapter_index, *bank: torch.Tensor):
        b = dict(zip(self.input_names, bank))
        token_mask = attention_mask.to(torch.float32).unsqueeze(-1)
        banked = _Banked(b, adapter_index, token_mask, self.layout, len(self.encoder.layers), self.kinds,
                         self.choices)
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
