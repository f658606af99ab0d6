"""A trained model as a pack of the shared layout (hpeft_serve/pack/layout.py), and packs stacked into a
bank of torch tensors (what the shared graph is traced and tested with). A pack holds only the tensors
that are not all their fill (compact); stacking pads what a pack leaves out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpeft_serve.pack.layout import (ACTS, FILL, LAYOUT_VERSION, Layout, bank_sizes, compact, input_names,  # noqa: F401
                                     needs, per_layer, place, resolve_shape, spec, split_n, symbols)
from hpeft_serve.methods.config import SITES
from hpeft_serve.slots.registry import KINDS

if TYPE_CHECKING:
    import torch

    from hpeft_serve.model import HybridModel


def pack(model: "HybridModel") -> tuple[dict[str, "torch.Tensor"], dict[str, int]]:
    """One adapter's tensors in the shared layout, less those that are all their fill (a compact pack:
    hpeft_serve.pack.layout.complete gives them back), and its sizes (the symbols of spec())."""
    import torch
    with torch.no_grad():
        tensors, sizes = _pack(model)
    return compact(tensors), sizes


def _pack(model: "HybridModel") -> tuple[dict, dict]:
    """Every spec tensor at its fill, then each registered slot kind reads its sizes and packs its slots."""
    import torch
    for kind in KINDS:
        kind.prepare(model)
    ec = model.encoder.config
    sizes = {"L": ec.num_hidden_layers, "d": ec.hidden_size, "f": ec.intermediate_size}
    for kind in KINDS:
        sizes |= kind.sizes(model)
    t = {k: torch.full(resolve_shape(s, sizes), FILL.get(k, 0.0)) for k, s in spec().items()}
    for kind in KINDS:
        kind.pack(t, model, sizes)
    return t, sizes


def stack(packs: list[tuple[dict, dict]], layout: Layout | None = None) -> dict[str, "torch.Tensor"]:
    """Stack packs into a bank [K, ...] of the bank tensors `layout` names (default: every kind, PHM for the
    n values of these packs), zero-padding each tensor to the bank sizes (exact)."""
    import torch
    sizes = bank_sizes([s for _, s in packs])
    if layout is None:
        ns = sorted({s["n"] for _, s in packs if s["r"] > 0})
        names = [n for n in spec() if not n.startswith("phm_")]
        names += [f"phm{n}_{base[4:]}" for n in ns for base in spec() if base.startswith("phm_")]
    else:
        names = layout.names()
    out = {}
    for name in names:
        base, _ = split_n(name)
        out[name] = torch.empty((len(packs), *resolve_shape(symbols(name), sizes)))
        for k, (t, s) in enumerate(packs):
            src = t[base] if base in t else torch.full(resolve_shape(spec()[base], s), FILL.get(base, 0.0))
            place(out[name][k], src, name, s)
    return out


def bank_feed(bank: dict, layout: Layout) -> dict:
    """A stacked bank ([K, L, ...] per slot) as the graph's inputs (input_names order); a PHM n the bank
    has no pack of is fed as zeros (its branch then adds exactly 0)."""
    import torch
    out = {}
    for n in layout.names():
        t = bank[n] if n in bank else torch.zeros(_zero_branch_shape(bank, n))
        if per_layer(n):
            out |= {f"{n}.{i}": t[:, i].contiguous() for i in range(t.shape[1])}
        else:
            out[n] = t
    return out


def _zero_branch_shape(bank: dict, name: str) -> tuple[int, ...]:
    if split_n(name)[1] is None:
        raise KeyError(f"the bank has no tensor {name!r} the graph takes")
    k, num_layers = bank["prefix_mask"].shape[:2]
    sizes = {"L": num_layers, "d": bank["head_dense_w"].shape[-1], "r": 1} | {f"O_{s}": 1 for s in SITES}
    return (k, *resolve_shape(symbols(name), sizes))
