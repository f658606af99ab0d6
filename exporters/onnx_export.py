"""ONNX export (opset 17) of the merged model (inputs input_ids, attention_mask: int64 [batch, seq], dynamic;
output logits: float32 [batch, labels], or embeddings: float32 [batch, hidden] for an embedding adapter)
and of the shared-backbone graph (plus adapter_index [batch] and the bank tensors [K, ...]; outputs logits
and embeddings); hpeft ops as opaque nodes with their function bodies attached.

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
TOKEN_AXES = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"},
              "embeddings": {0: "batch"}}


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


def export_onnx(module: torch.nn.Module, args: tuple, input_names: list[str], dynamic_axes: dict, path: Path,
                external_data: bool = False, output_names: tuple[str, ...] = ("logits",)) -> Path:
    """Trace `module` (eval mode) to `path`, attach hpeft function bodies, check with onnx.checker."""
    register_symbolics()
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=list(output_names), dynamic_axes=dynamic_axes, custom_opsets=_custom_opsets(module),
                          do_constant_folding=True)
    m = attach_functions(onnx.load(str(path)))
    onnx.checker.check_model(m, full_check=True)
    if external_data:  # the backbone's weights beside the graph, written once
        data = path.with_name(path.name + ".data")
        if data.exists():
            data.unlink()
        onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                  size_threshold=1024)
    else:
        onnx.save(m, str(path))
    return path


def merged_outputs(model) -> tuple[str, ...]:
    """A merged model's one output: embeddings for an embedding adapter, else logits."""
    return ("embeddings",) if model.head.cfg.embedding else ("logits",)


def export_merged_onnx(model: torch.nn.Module, path: Path) -> Path:
    return export_onnx(model, example_inputs(model.encoder.config.vocab_size), list(INPUTS), TOKEN_AXES, path,
                       output_names=merged_outputs(model))
