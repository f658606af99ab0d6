"""Merged inference models: fold what folds exactly, keep the rest as extra ops with constant weights.
Each slot kind's rule is its module's (hpeft_serve/slots/*.py, MERGE):

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
from hpeft_serve.slots.registry import KINDS, implementing


def _projections(layer) -> dict:
    return {"q": layer.attention.self.query, "k": layer.attention.self.key, "v": layer.attention.self.value,
            "o": layer.attention.output.dense, "ffn_in": layer.intermediate.dense, "ffn_out": layer.output.dense,
            "attn_ln": layer.attention.output.LayerNorm, "ffn_ln": layer.output.LayerNorm}


@torch.no_grad()
def merge(model: HybridModel, fold_phm: bool = False) -> HybridModel:
    """A folded copy of `model` (eval mode) computing the same logits; the original is untouched. Each
    registered slot kind (hpeft_serve/slots) folds what it can: whole-model steps, then per layer in the
    kinds' MERGE_ORDER (BitFit, (IA)^3, LoRA), then finishing steps."""
    m = copy.deepcopy(model).eval()
    for k in KINDS:
        k.merge_model(m, fold_phm)
    by_layer = sorted(implementing("merge_layer"), key=lambda k: k.MERGE_ORDER)
    for la, layer in zip(m.adapters.layers, m.encoder.layers):
        proj = _projections(layer)
        for k in by_layer:
            k.merge_layer(la, proj)
    for k in KINDS:
        k.merge_finish(m)
    return m
