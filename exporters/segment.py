"""Row-segmented slot compute for the shared graph: a slot kind's work runs only for the rows of the batch
whose adapter uses it.

A kind is one function `fn(base, *xs, index, ws) -> new rows of base`: `base` (R, ...) what the layer has
computed so far for R rows, `xs` per-row tensors (R, ...), `index` (R,) the rows' adapters, `ws` the bank
tensors ([K, ...], gathered inside by `index`) and frozen weights it reads. It is traced once (shared by
every layer) and run by a TorchScript dispatcher, so that ONNX (`If`) and TorchScript keep the
data-dependent choice.

Which rows use what is worked out once per forward, not per kind per layer (`Usage`): every (kind, layer)
of the graph is one row j of a per-adapter usage matrix (N, K), true exactly where the adapter's kind adds
something in that layer (a non-zero scale or gate flag; for the prefix, an unmasked position): one Concat of
the bank's (K,) scales, one Gather by the batch's rows (N, B), one reduction each to two flag vectors,
every row uses column j (`every`) and some row does (`some`), each Split once into N (1,) conditions. The
dispatcher of column j:
  every[j]        -> fn on the whole batch (no NonZero, no gather of rows, no scatter);
  else some[j]    -> fn on the rows of column j only (NonZero, Gather), written back into base (ScatterND);
  else            -> base unchanged, nothing computed.
So a kind used by every row costs one `If`, a kind no row uses two `If`s with nothing in them. Skipping a
row is exact: its weight is 0 only where the kind's output is exactly 0 for it (a zero scale, an
all-masked prefix), so base is what the full computation gives for it.
"""

from __future__ import annotations

import warnings
from typing import Callable, List

import torch


def _script1(f):
    def run(base: torch.Tensor, every: torch.Tensor, some: torch.Tensor, uses: torch.Tensor, j: int,
            x0: torch.Tensor, index: torch.Tensor, ws: List[torch.Tensor]) -> torch.Tensor:
        if bool(every):
            return f(base, x0, index, ws)
        if bool(some):
            rows = uses[j].nonzero().squeeze(1)
            got = f(base.index_select(0, rows), x0.index_select(0, rows), index.index_select(0, rows), ws)
            return base.index_put([rows], got)
        return base
    return torch.jit.script(run)


def _script2(f):
    def run(base: torch.Tensor, every: torch.Tensor, some: torch.Tensor, uses: torch.Tensor, j: int,
            x0: torch.Tensor, x1: torch.Tensor, index: torch.Tensor, ws: List[torch.Tensor]) -> torch.Tensor:
        if bool(every):
            return f(base, x0, x1, index, ws)
        if bool(some):
            rows = uses[j].nonzero().squeeze(1)
            got = f(base.index_select(0, rows), x0.index_select(0, rows), x1.index_select(0, rows),
                    index.index_select(0, rows), ws)
            return base.index_put([rows], got)
        return base
    return torch.jit.script(run)


def _script3(f):
    def run(base: torch.Tensor, every: torch.Tensor, some: torch.Tensor, uses: torch.Tensor, j: int,
            x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, index: torch.Tensor,
            ws: List[torch.Tensor]) -> torch.Tensor:
        if bool(every):
            return f(base, x0, x1, x2, index, ws)
        if bool(some):
            rows = uses[j].nonzero().squeeze(1)
            got = f(base.index_select(0, rows), x0.index_select(0, rows), x1.index_select(0, rows),
                    x2.index_select(0, rows), index.index_select(0, rows), ws)
            return base.index_put([rows], got)
        return base
    return torch.jit.script(run)


_SCRIPTS = {1: _script1, 2: _script2, 3: _script3}


class Usage:
    """Which rows of the batch use each column (kind, layer): built once per forward from the per-adapter
    weights of every column (`add(key, w, w2)`: the adapter uses the column where w (K,) or w2 is non-zero),
    then `done(index)`: `uses` (N, B) bool, and per column j `every[j]`, `some[j]` (1,) bool (one Split each,
    so a kind's flag costs no node of its own), `col[key]` the column of key."""

    def __init__(self):
        self.col: dict[str, int] = {}
        self._w: list[torch.Tensor] = []
        self._w2: list[torch.Tensor] = []
        self.uses: torch.Tensor | None = None
        self.every: list[torch.Tensor] = []
        self.some: list[torch.Tensor] = []

    def add(self, key: str, w: torch.Tensor, w2: torch.Tensor | None = None) -> None:
        self.col[key] = len(self._w)
        self._w.append(w)
        self._w2.append(w if w2 is None else w2)

    def done(self, index: torch.Tensor) -> None:
        n = len(self._w)
        if not n:
            return
        used = torch.cat(self._w) != 0.0  # (N * K,): one Concat of every column's (K,)
        if any(a is not b for a, b in zip(self._w, self._w2)):
            used = used | (torch.cat(self._w2) != 0.0)
        self.uses = used.reshape(n, -1).index_select(1, index)  # (N, B): one Gather by the batch's rows
        self.every = list(self.uses.all(dim=1).split(1))
        self.some = list(self.uses.any(dim=1).split(1))


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

    def __call__(self, base: torch.Tensor, usage: Usage, key: str, xs: list[torch.Tensor], index: torch.Tensor,
                 ws: list[torch.Tensor]) -> torch.Tensor:
        j = usage.col[key]
        return self.run(base, usage.every[j], usage.some[j], usage.uses, j, *xs, index, ws)

    def everywhere(self, base, xs, index, ws) -> torch.Tensor:
        """The kind for every row, in plain PyTorch (inputs that do not carry the batch's rows, such as
        DeBERTa's relative embeddings (1, 2A, D), broadcast against every row's weights)."""
        return self.fn(base, *xs, index, ws)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax((q @ k.transpose(-1, -2)) * scale + mask, dim=-1) @ v


def _with_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                 pmask: torch.Tensor, mask_add: torch.Tensor, scale: float) -> torch.Tensor:
    """The encoder's attention over prefix + tokens (hpeft_serve/encoder.py), for rows that have a prefix."""
    mask = torch.cat([pmask.unsqueeze(1).unsqueeze(1), mask_add], dim=-1)  # (R, 1, 1, P + S)
    return _attend(q, torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), mask, scale)


@torch.jit.script
def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                     pmask: torch.Tensor, mask_add: torch.Tensor, every: torch.Tensor, some: torch.Tensor,
                     uses: torch.Tensor, scale: float) -> torch.Tensor:
    """Row-segmented prefix attention: q, k, v (B, H, S, Dh), pk, pv (B, H, P, Dh), pmask (B, P), mask_add
    (B, 1, 1, S), `uses` (B,) bool: the rows with a prefix position in this layer. Only those rows attend to
    the prefix columns; the others attend to their tokens alone, which is what their adapter computes (a
    masked column adds exactly 0 there, but costs onnxruntime's Softmax about twice a plain column: the
    exp of float32 min). The two groups' outputs are concatenated and put back in row order by one Gather."""
    if bool(every):
        return _with_prefix(q, k, v, pk, pv, pmask, mask_add, scale)
    if bool(some):
        rows, others = uses.nonzero().squeeze(1), (~uses).nonzero().squeeze(1)
        a = _with_prefix(q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows),
                         pk.index_select(0, rows), pv.index_select(0, rows), pmask.index_select(0, rows),
                         mask_add.index_select(0, rows), scale)
        b = _attend(q.index_select(0, others), k.index_select(0, others), v.index_select(0, others),
                    mask_add.index_select(0, others), scale)
        # row r's place in cat(rows, others): its rank among the rows with a prefix, or after them among the rest
        u = uses.to(torch.int64)
        place = torch.where(uses, u.cumsum(0) - 1, rows.shape[0] + (1 - u).cumsum(0) - 1)
        return torch.cat([a, b], dim=0).index_select(0, place)
    return _attend(q, k, v, mask_add, scale)


class Choice:
    """One computation in two traced forms and a scripted If between them: `with_rows(x, w, b, delta)` when
    some row of the batch uses the kind in this layer, else `plain(x, w, b)` (the frozen module's, which
    onnxruntime fuses as it does the merged model's: the bias Add into BiasGelu, the LayerNorm's bias into
    LayerNormalization). Exact: `plain` is what `with_rows` gives where every delta is 0."""

    def __init__(self, plain: Callable, with_rows: Callable, example: tuple):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            p = torch.jit.trace(plain, example[:3], check_trace=False)
            r = torch.jit.trace(with_rows, example, check_trace=False)

        def run(some: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            if bool(some):
                return r(x, w, b, d)
            return p(x, w, b)
        self.run = torch.jit.script(run)
