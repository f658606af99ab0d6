"""TorchScript export: a traced module of plain aten ops (no hpeft custom op, no extra library), loadable
by torch.jit.load in any libtorch (Triton's pytorch backend); called as module(input_ids, attention_mask)
and returning the logits tensor. Also a torch.export program (.pt2) where it works."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .onnx_export import example_inputs


def export_torchscript(model: torch.nn.Module, path: Path) -> Path:
    model.eval()
    args = example_inputs(model.encoder.config.vocab_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, args, check_trace=False)
        traced.save(str(path))
    return path


def export_program(model: torch.nn.Module, path: Path) -> Path | None:
    """torch.export (.pt2) with dynamic batch and sequence; None where torch.export cannot take the model."""
    model.eval()
    args = example_inputs(model.encoder.config.vocab_size, batch=3, seq=9)
    b, s = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=512)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, args, dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}), strict=False)
            torch.export.save(ep, str(path))
        return path
    except Exception:  # noqa: BLE001 - an optional artefact; the traced module is the contract
        return None
