"""Merged inference models: fold what folds exactly, keep the rest as extra ops with constant weights.

- LoRA without a gate: W <- W + (alpha / r) B A (a gated LoRA depends on its input: kept as ops).
- BitFit: frozen bias <- bias + delta (the same fp32 addition the model does at run time).
- (IA)^3: a per-channel scale, exact: W <- W * l on rows (and b <- b * l) or on columns (input scaling); after
  BitFit (the scale covers the delta) and before LoRA (the scale does not cover the LoRA update).
- Prefix: ejected to constant key/value vectors.
- SparseAdapter: pre-masked weights, stored as their non-zeros for hpeft::SparseLinear.
- PHM (Compacter): kept as hpeft::PHMLinear by default; `fold_phm=True` folds each PHM layer into a dense
  weight H^T, which bench/export.py measured faster at small adapter shapes (384 -> 12 on MiniLM) and
  slower at large ones (768 -> 3072).
"""

from __future__ import annotations

import copy

import torch

from hpeft_serve.model import HybridModel


def _projections(layer) -> dict:
    return {"q": layer.attention.self.query, "k": layer.attention.self.key, "v": layer.attention.self.value,
            "o": layer.attention.output.dense, "ffn_in": layer.intermediate.dense, "ffn_out": layer.output.dense,
            "attn_ln": layer.attention.output.LayerNorm, "ffn_ln": layer.output.LayerNorm}


def _fold_phm(m: HybridModel) -> None:
    from hpeft_serve.methods.bottleneck import DenseProj, PHMProj
    from hpeft_serve.methods.functional import phm_weight
    rule = m.adapters.phm_rule
    for la in m.adapters.layers:
        for b in la.seq.values():
            for attr in ("adapter_down", "adapter_up"):
                p = getattr(b, attr)
                if isinstance(p, PHMProj):
                    h = phm_weight(rule, p.phm_W_left, p.phm_W_right)  # (in, out)
                    dense = DenseProj(h.shape[0], h.shape[1], sparse=False)
                    dense.weight.copy_(h.t())
                    dense.bias.copy_(p.bias)
                    setattr(b, attr, dense)


@torch.no_grad()
def merge(model: HybridModel, fold_phm: bool = False) -> HybridModel:
    """A folded copy of `model` (eval mode) computing the same logits; the original is untouched."""
    m = copy.deepcopy(model).eval()
    m.adapters.eject_prefix()
    if fold_phm:
        _fold_phm(m)
    for la, layer in zip(m.adapters.layers, m.encoder.layers):
        proj = _projections(layer)
        if la.bitfit is not None:
            for name, delta in la.bitfit.items():
                proj[name].bias += delta
            la.bitfit = None
        if la.ia3 is not None:
            from hpeft_serve.methods.ia3 import merge_into
            for name, scale in la.ia3.items():
                merge_into(name, proj[name], scale)
            la.ia3 = None
        for t in [t for t, lo in la.lora.items() if lo.gate is None]:
            proj[t].weight.copy_(la.lora[t].merged_weight(proj[t].weight))
            del la.lora[t]
    for p in m.adapters.sparse_projections():
        p.prepare_compact_export()
    return m
