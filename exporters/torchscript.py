"""TorchScript export: a traced module of plain aten ops (no hpeft custom op, no extra library), loadable
by torch.jit.load in any libtorch (Triton's pytorch backend); a merged model is called as
module(input_ids, attention_mask) and returns the logits tensor (an embedding adapter's: the embeddings
tensor [batch, hidden]); a shared graph returns (logits, embeddings). Also a torch.export program (.pt2)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def export_torchscript(module: torch.nn.Module, args: tuple, path: Path) -> Path:
    module.eval().requires_grad_(False)  # an inference artefact: outputs need no autograd
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, args, check_trace=False)
        traced.save(str(path))
    return path


def export_program(module: torch.nn.Module, args: tuple, path: Path) -> Path | None:
    """torch.export (.pt2) with dynamic batch and sequence; None where torch.export cannot take the model."""
    module.eval()
    b, s = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=512)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, args, dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}), strict=False)
            torch.export.save(ep, str(path))
        return path
    except Exception:  # noqa: BLE001 - an optional artefact; the traced module is the contract
        return None
