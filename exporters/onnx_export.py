"""ONNX export of a (merged) HybridModel: inputs input_ids, attention_mask (int64 [batch, seq], dynamic),
output logits (float32 [batch, labels]); hpeft ops as opaque nodes with their function bodies attached.

The TorchScript-based exporter (`dynamo=False`) is used: it exports MiniLM in about a second where the
dynamo exporter takes tens of seconds (shared/research/onnx.md), and it keeps the custom ops as nodes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from .ops import OPSET, attach_functions, register_symbolics

INPUTS = ("input_ids", "attention_mask")


def example_inputs(vocab: int = 1000, batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(vocab, 1000), (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0
    return ids, mask


def _custom_opsets(model: torch.nn.Module) -> dict:
    from hpeft_serve.methods.bottleneck import PHMProj
    uses = any(isinstance(m, PHMProj) or getattr(m, "sparse_mask", None) is not None for m in model.modules())
    return {"hpeft": 1} if uses else {}


def export_onnx(model: torch.nn.Module, path: Path) -> Path:
    """Write `model` (eval mode) to `path` and check it with onnx.checker."""
    register_symbolics()
    model.eval()
    args = example_inputs(model.encoder.config.vocab_size)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=OPSET, input_names=list(INPUTS),
                          output_names=["logits"], dynamic_axes=dyn, custom_opsets=_custom_opsets(model),
                          do_constant_folding=True)
    m = attach_functions(onnx.load(str(path)))
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return path
