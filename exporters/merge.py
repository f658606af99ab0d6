"""Merged inference models: fold what folds exactly, keep the rest as extra ops with constant weights.

- LoRA without a gate: W <- W + (alpha / r) B A (a gated LoRA depends on its input: kept as ops).
- BitFit: frozen bias <- bias + delta (the same fp32 addition the model does at run time).
- Prefix: ejected to constant key/value vectors.
- SparseAdapter: pre-masked weights, stored as their non-zeros for hpeft::SparseLinear.
- PHM (Compacter): kept as hpeft::PHMLinear (the low-rank body is cheaper than the dense H it would fold to).
"""

from __future__ import annotations

import copy

import torch

from hpeft_serve.model import HybridModel


def _projections(layer) -> dict:
    return {"q": layer.attention.self.query, "k": layer.attention.self.key, "v": layer.attention.self.value,
            "o": layer.attention.output.dense, "ffn_in": layer.intermediate.dense, "ffn_out": layer.output.dense,
            "attn_ln": layer.attention.output.LayerNorm, "ffn_ln": layer.output.LayerNorm}


@torch.no_grad()
def merge(model: HybridModel) -> HybridModel:
    """A folded copy of `model` (eval mode) computing the same logits; the original is untouched."""
    m = copy.deepcopy(model).eval()
    m.adapters.eject_prefix()
    for la, layer in zip(m.adapters.layers, m.encoder.layers):
        proj = _projections(layer)
        if la.bitfit is not None:
            for name, delta in la.bitfit.items():
                proj[name].bias += delta
            la.bitfit = None
        for t in [t for t, lo in la.lora.items() if lo.gate is None]:
            proj[t].weight.copy_(la.lora[t].merged_weight(proj[t].weight))
            del la.lora[t]
    for p in m.adapters.sparse_projections():
        p.prepare_compact_export()
    return m
