"""Row-segmented slot compute for the shared graph: a slot kind's work runs only for the rows of the batch
whose adapter uses it.

A kind is one function `fn(base, *xs, index, ws) -> new rows of base`: `base` (R, ...) what the layer has
computed so far for R rows, `xs` per-row tensors (R, ...), `index` (R,) the rows' adapters, `ws` the bank
tensors ([K, ...], gathered inside by `index`) and frozen weights it reads. It is traced once (shared by
every layer) and run by a TorchScript dispatcher, so that ONNX (an `If` per kind) and TorchScript keep the
data-dependent choice, for a per-row weight `use` (B,) that is 0 exactly where the kind adds nothing:
  every row uses it -> fn on the whole batch (no gather);
  some rows         -> fn on those rows only (NonZero, Gather), written back into base (ScatterND);
  no row            -> base unchanged, nothing computed.
Skipping a row is exact: its `use` is 0 only where the kind's output is exactly 0 for it (a zero scale,
an all-masked prefix), so base is what the full computation gives for it.
"""

from __future__ import annotations

import warnings
from typing import Callable, List

import torch


def _script1(f):
    def run(base: torch.Tensor, use: torch.Tensor, x0: torch.Tensor, index: torch.Tensor,
            ws: List[torch.Tensor]) -> torch.Tensor:
        if bool(use.min() > 0.0):
            return f(base, x0, index, ws)
        if bool(use.max() > 0.0):
            rows = use.nonzero().squeeze(1)
            got = f(base.index_select(0, rows), x0.index_select(0, rows), index.index_select(0, rows), ws)
            return base.index_put([rows], got)
        return base
    return torch.jit.script(run)


def _script2(f):
    def run(base: torch.Tensor, use: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, index: torch.Tensor,
            ws: List[torch.Tensor]) -> torch.Tensor:
        if bool(use.min() > 0.0):
            return f(base, x0, x1, index, ws)
        if bool(use.max() > 0.0):
            rows = use.nonzero().squeeze(1)
            got = f(base.index_select(0, rows), x0.index_select(0, rows), x1.index_select(0, rows),
                    index.index_select(0, rows), ws)
            return base.index_put([rows], got)
        return base
    return torch.jit.script(run)


def _script3(f):
    def run(base: torch.Tensor, use: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor,
            index: torch.Tensor, ws: List[torch.Tensor]) -> torch.Tensor:
        if bool(use.min() > 0.0):
            return f(base, x0, x1, x2, index, ws)
        if bool(use.max() > 0.0):
            rows = use.nonzero().squeeze(1)
            got = f(base.index_select(0, rows), x0.index_select(0, rows), x1.index_select(0, rows),
                    x2.index_select(0, rows), index.index_select(0, rows), ws)
            return base.index_put([rows], got)
        return base
    return torch.jit.script(run)


_SCRIPTS = {1: _script1, 2: _script2, 3: _script3}


class Kind:
    """One slot kind: `fn` (plain PyTorch, the math) and its segmented dispatcher."""

    def __init__(self, fn: Callable, names: list[str], example: tuple):
        """`names`: the bank tensors `fn` reads from `ws` (in order; frozen weights follow them); `example`:
        (base, *xs, index, ws) with every size distinct and > 1, so the trace bakes in none of them."""
        self.fn, self.names, self.arity = fn, names, len(example) - 3
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            self.traced = torch.jit.trace(fn, example, check_trace=False)
        self.run = _SCRIPTS[self.arity](self.traced)

    def __call__(self, base: torch.Tensor, use: torch.Tensor, xs: list[torch.Tensor], index: torch.Tensor,
                 ws: list[torch.Tensor]) -> torch.Tensor:
        return self.run(base, use, *xs, index, ws)

    def everywhere(self, base, xs, index, ws) -> torch.Tensor:
        """The kind for every row, in plain PyTorch (inputs that do not carry the batch's rows, such as
        DeBERTa's relative embeddings (1, 2A, D), broadcast against every row's weights)."""
        return self.fn(base, *xs, index, ws)
