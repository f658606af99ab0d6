"""An adapter set: every component of a MethodConfig, placed in the layers of one encoder.

`LayerAdapters` implements the encoder's `LayerHooks` for one layer (LoRA, BitFit, prefix gate and the
sequential/parallel bottleneck adapters of both sites); `AdapterSet` holds them plus what is shared across
layers: the prefix pool (one MLP for all layers while training) and the PHM rule (Compacter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..encoder import EncoderConfig, LayerContext, LayerHooks
from ..errors import ConfigError
from .bitfit import make_bitfit
from .bottleneck import Bottleneck, DenseProj
from .config import BitFitConfig, BottleneckConfig, IA3Config, LoRAConfig, MethodConfig, PrefixConfig, layers_of
from .gate import Gate
from .ia3 import make_ia3, scaled_linear
from .lora import LoRA
from .prefix import PrefixPool

LINEAR_DIMS = {"q": ("d", "d"), "k": ("d", "d"), "v": ("d", "d"), "o": ("d", "d"),
               "ffn_in": ("d", "f"), "ffn_out": ("f", "d")}


class LayerAdapters(LayerHooks):
    def __init__(self):
        super().__init__()
        self.lora = nn.ModuleDict()
        self.seq = nn.ModuleDict()  # site -> Bottleneck on the sub-layer output
        self.par = nn.ModuleDict()  # site -> Bottleneck beside the sub-layer
        self.bitfit: nn.ParameterDict | None = None
        self.ia3: nn.ParameterDict | None = None  # (IA)^3 scales, per target
        self.prefix_gate: Gate | None = None
        self.has_prefix = False

    def linear(self, name, x, layer, ctx):
        b = layer.bias if self.bitfit is None else layer.bias + self.bitfit[name]
        if self.ia3 is not None and name in self.ia3:
            y = scaled_linear(name, x, layer.weight, b, self.ia3[name])
        else:
            y = F.linear(x, layer.weight, b)
        if name in self.lora:
            y = y + self.lora[name](x, ctx.token_mask)
        return y

    def layer_norm(self, name, x, ln):
        b = ln.bias if self.bitfit is None else ln.bias + self.bitfit[name]
        return F.layer_norm(x, ln.normalized_shape, ln.weight, b, ln.eps)

    def prefix(self, x, ctx: LayerContext):
        if not self.has_prefix:
            return None
        k, v = ctx.shared["prefix"]  # (P, D) each
        k, v = k.unsqueeze(0), v.unsqueeze(0)
        if self.prefix_gate is not None:
            g = self.prefix_gate(x, ctx.token_mask)  # (B, 1, 1)
            k, v = g * k, g * v
        return k, v, None

    def residual(self, site, h, a, ln, ctx):
        rule = ctx.shared.get("phm_rule")
        out = h + a
        if site in self.seq:
            ad = self.seq[site]
            x_a = self.layer_norm(f"{site}_ln", h + a, ln) if ad.cfg.ln_before else h
            out = ad(x_a, ctx.token_mask, rule) + h + a
        if site in self.par:
            out = out + self.par[site](a, ctx.token_mask, rule)
        return self.layer_norm(f"{site}_ln", out, ln)


class AdapterSet(nn.Module):
    def __init__(self, mc: MethodConfig, ec: EncoderConfig):
        super().__init__()
        self.method_config = mc
        L, d, f = ec.num_hidden_layers, ec.hidden_size, ec.intermediate_size
        masked = mc.gate_pooling == "masked"
        self.layers = nn.ModuleList(LayerAdapters() for _ in range(L))
        self.prefix: PrefixPool | None = None
        self.prefix_layers: tuple[int, ...] = ()
        self.position_offset = 0  # token positions start here (peft prefix tuning: after the prefix)
        self.phm_rule: nn.Parameter | None = None
        dims = {"d": d, "f": f}
        for c in mc.components:
            layers = layers_of(c, L)
            if isinstance(c, LoRAConfig):
                self._add_lora(c, layers, dims, masked)
            elif isinstance(c, PrefixConfig):
                self._add_prefix(c, layers, d, masked)
            elif isinstance(c, BottleneckConfig):
                self._add_bottleneck(c, layers, d, masked)
            elif isinstance(c, BitFitConfig):
                for i in layers:
                    self.layers[i].bitfit = make_bitfit(d, f)
            elif isinstance(c, IA3Config):
                for i in layers:
                    if self.layers[i].ia3 is not None:
                        raise ConfigError(f"two (IA)^3 components in layer {i}")
                    self.layers[i].ia3 = make_ia3(c.targets, dims)

    def _add_lora(self, c: LoRAConfig, layers, dims, masked) -> None:
        for i in layers:
            for t in c.targets:
                if t in self.layers[i].lora:
                    raise ConfigError(f"two LoRA components adapt {t} in layer {i}")
                d_in, d_out = (dims[k] for k in LINEAR_DIMS[t])
                self.layers[i].lora[t] = LoRA(d_in, d_out, c.r, c.alpha, c.gate, masked, c.rslora)

    def _add_prefix(self, c: PrefixConfig, layers, d, masked) -> None:
        if self.prefix is not None:
            raise ConfigError("only one prefix component is allowed per method")
        self.prefix = PrefixPool(len(layers), c.length, d, c.bottleneck)
        self.prefix_layers = layers
        self.position_offset = c.length if c.shift_positions else 0
        for i in layers:
            self.layers[i].has_prefix = True
            if c.gate:
                self.layers[i].prefix_gate = Gate(d, masked=masked)

    def _add_bottleneck(self, c: BottleneckConfig, layers, d, masked) -> None:
        if c.phm_n:
            if self.phm_rule is not None and self.phm_rule.shape[0] != c.phm_n:
                raise ConfigError("all PHM adapters of a method share one rule: use the same phm_n")
            if self.phm_rule is None:  # Compacter: rule shared across layers and projections, N(0, 1e-4)
                self.phm_rule = nn.Parameter(torch.randn(c.phm_n, c.phm_n, c.phm_n) * 1e-4)
        for i in layers:
            slots = self.layers[i].seq if c.mode == "sequential" else self.layers[i].par
            if c.site in slots:
                raise ConfigError(f"two {c.mode} adapters at site {c.site} in layer {i}")
            try:
                slots[c.site] = Bottleneck(c, d, masked)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def shared_tensors(self) -> list[dict[str, torch.Tensor]]:
        """Per layer: its prefix (keys, values) and the PHM rule, computed once per forward."""
        out: list[dict] = [{} for _ in self.layers]
        if self.prefix is not None:
            kv = self.prefix()  # (n_layers, 2, P, D)
            for j, i in enumerate(self.prefix_layers):
                out[i]["prefix"] = (kv[j, 0], kv[j, 1])
        if self.phm_rule is not None:
            for o in out:
                o["phm_rule"] = self.phm_rule
        return out

    def eject_prefix(self) -> None:
        if self.prefix is not None:
            self.prefix.eject()

    def sparse_projections(self) -> list[DenseProj]:
        return [p for la in self.layers for ad in list(la.seq.values()) + list(la.par.values())
                for p in ad.sparse_projections()]

    def sparse_settings(self) -> tuple[str, float] | None:
        """(pruner, sparsity) of the sparse components (one global threshold needs one setting)."""
        found = {(c.pruner, c.sparsity) for c in self.method_config.components
                 if isinstance(c, BottleneckConfig) and c.sparsity > 0}
        if len(found) > 1:
            raise ConfigError(f"sparse adapters of one method must share pruner and sparsity, got {sorted(found)}")
        return found.pop() if found else None
