"""The shared-backbone slot layout: what a pack is, with no torch (the serving path imports it).

One layout holds every method: per layer, LoRA on the six projections, prefix keys/values (with a mask),
a sequential and a parallel bottleneck adapter per site, a PHM (Compacter) sequential adapter per site,
gates, BitFit bias deltas; plus the head. A pack is one adapter's tensors in this layout (no K axis);
what an adapter lacks is exact zeros (zero-width ranks, masked prefix positions, zero deltas), and flags
(0/1) select per adapter what cannot be zero-padded: gated or scaled, LayerNorm before the sequential
adapter or not, the activation, the pooling (head_cls, head_max), L2 normalisation (head_norm), the gate
pooling. A bank stacks packs on a new first axis [K, ...], padding every size to the largest (ranks, prefix
length, widths, labels) with exact zeros.

Heads: a classifier's pack fills head_dense/head_out (C labels); an embedding adapter's has C = 0 (its
head tensors are zeros and its logits come out as float32 min: "no label") and sets the pooling and
normalisation flags of its `embeddings` output. The reserved name BACKBONE ("@backbone", not a valid pack
name) serves the plain backbone as an embedder: `backbone_pack`, an all-zero adapter.

PHM slots come in one kind per n (a pack has one n, the size of its rule): the bank and the graph hold
`phm{n}_...` tensors for each n they serve (a PHM branch per (n, site)); a pack fills the branch of its
own n and is zeros in the others (an all-zero branch adds exactly 0).
How a trained model becomes a pack (torch) is exporters/layout.py.

Each slot kind is one module of hpeft_serve/slots, listed in slots/registry.py: spec(), FILL, the Layout's
fields, names(), union() and needs() here are assembled from the kinds' declarations.

Packs are stored compactly: a pack file holds only the tensors that are not all their fill (zeros; the
prefix mask's and the padded logit's float32 min), so a LoRA's pack is its LoRA and head tensors, not the
union's slots; `complete` gives the missing ones back (packs written whole before stay readable). The
padding to the union and to the bank's sizes happens in the bank only.
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache

import numpy as np

from ..errors import CheckpointError
from ..slots.base import NEG  # noqa: F401  (re-exported: the kinds' modules own these)
from ..slots.bottleneck import ACTS  # noqa: F401
from ..slots.head import OPTIONAL  # noqa: F401
from ..slots.registry import KINDS

LAYOUT_VERSION = 1
FIXED = ("L", "d", "f")  # the backbone's sizes: every pack of a graph has these
TASKS = ("classification", "embedding")
EMBED_POOLINGS = ("mean", "cls", "max")
BACKBONE = "@backbone"  # the plain backbone's embedding (reserved: NAME never matches it)


@lru_cache(maxsize=1)
def spec() -> dict[str, tuple]:
    """Per pack tensor: its shape in symbols (L layers, d hidden, f FFN, named sizes padded across a bank),
    every registered slot kind's (hpeft_serve/slots), in registry order, their LEAD tensors first."""
    every = [k.spec() for k in KINDS]
    lead = {n: s[n] for k, s in zip(KINDS, every) for n in k.LEAD}
    return lead | {n: v for s in every for n, v in s.items() if n not in lead}


def size_keys() -> tuple[str, ...]:
    """Every size a pack's json names (the symbols of spec())."""
    return tuple(dict.fromkeys(s for shape in spec().values() for s in shape
                               if isinstance(s, str) and s != "d/n"))


FILL = {n: v for k in KINDS for n, v in k.FILL.items()}  # padding that must stay out of softmax / argmax
_PHM_N = re.compile(r"phm(\d+)_(.+)")


def is_fill(name: str, t) -> bool:
    """Whether pack tensor `t` (numpy or torch) is all its fill: a compact pack leaves it out."""
    return bool((t == FILL.get(name, 0.0)).all())


def compact(tensors: dict) -> dict:
    """A pack's tensors less those that are all their fill (what a pack file holds)."""
    return {k: t for k, t in tensors.items() if not is_fill(k, t)}


def complete(tensors: dict, sizes: dict) -> dict:
    """A compact pack's tensors (numpy) with every spec tensor it leaves out, at its fill."""
    missing = {k: np.full(resolve_shape(syms, sizes), FILL.get(k, 0.0), np.float32)
               for k, syms in spec().items() if k not in tensors}
    return tensors | missing if missing else tensors


def split_n(name: str) -> tuple[str, int | None]:
    """A bank tensor's pack tensor and PHM n: `phm4_ffn_down_Wl` -> (`phm_ffn_down_Wl`, 4); others (name, None)."""
    m = _PHM_N.fullmatch(name)
    return (f"phm_{m[2]}", int(m[1])) if m else (name, None)


def symbols(name: str) -> tuple:
    """The shape in symbols of a bank tensor (no K axis): a PHM tensor's n is its kind's, a number."""
    base, n = split_n(name)
    s = spec()[base]
    return s if n is None else tuple(n if x == "n" else f"d/{n}" if x == "d/n" else x for x in s)


def resolve_shape(syms: tuple, sizes: dict) -> tuple[int, ...]:
    out = []
    for s in syms:
        if isinstance(s, int):
            out.append(s)
        elif s.startswith("d/"):
            out.append(sizes["d"] // (sizes["n"] if s == "d/n" else int(s[2:])))
        else:
            out.append(sizes[s])
    return tuple(out)


def bank_sizes(all_sizes: list[dict]) -> dict:
    """The sizes of a bank: the largest of each over its packs (L, d, f: all equal). PHM kinds are per n, so
    n is not a bank size; PHM ranks and widths and the labels stay >= 1 (exact zeros, a float32-min logit):
    ONNX Reshape reads a 0 in a target shape as "copy this dim"."""
    fixed = {k: all_sizes[0][k] for k in FIXED}
    for s in all_sizes:
        if any(s[k] != v for k, v in fixed.items()):
            raise ValueError(f"packs for different backbones cannot share a bank: {fixed} vs "
                             f"{ {k: s[k] for k in FIXED} }")
    out = {k: max(s[k] for s in all_sizes) for k in all_sizes[0] if k != "n"}
    for kind in KINDS:  # the kinds' minimums (PHM r and widths, C: a bank of embedding adapters only still
        out |= {k: max(out[k], v) for k, v in kind.BANK_MIN.items()}  # has one float32-min logit column)
    return out


def place(dst, src, name: str, pack_sizes: dict) -> None:
    """Write one pack tensor `src` into the bank slot `dst` of bank tensor `name` (numpy array or torch
    tensor, bank sizes), padding with exact zeros (or the mask fill); a PHM slot of another n than the
    pack's (or any PHM slot of a pack without PHM adapters) is all zeros."""
    base, n = split_n(name)
    dst[...] = FILL.get(base, 0.0)
    if base.startswith("phm_") and (pack_sizes["r"] == 0 or (n is not None and pack_sizes["n"] != n)):
        dst[...] = 0.0
        return
    dst[tuple(slice(0, k) for k in src.shape)] = src


def copy_slot(dst, src) -> None:
    """Move one resident slot between banks of different sizes: the overlap is copied, the rest of `dst`
    keeps its fill. Exact both ways: a bank's sizes are at least every resident's, so what a smaller bank
    cuts off is padding."""
    common = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))
    dst[common] = src[common]


# ---------------------------------------------------------------- the slots a graph actually takes
class _Layout:
    """The slot kinds a shared graph takes (the union over the adapters exported into it): a frozen
    dataclass whose fields are the registered kinds' (slots/*.py FIELDS), serialised in backbone.json under
    their names. A slot no adapter uses is left out of the graph entirely: an absent slot and an all-zero
    slot give the same logits, so packs never change; a new adapter that needs a new kind of slot re-exports
    the graph. PHM: a branch for each n in `phm_n` at each site in `phm`. `embeddings`: the graph has the
    `embeddings` output (and the head_max / head_norm inputs); graphs exported before it lack it, every new
    one has it."""

    def phm_prefixes(self) -> list[str]:
        """The PHM branches, `phm{n}_{site}`."""
        return [f"phm{n}_{s}" for n in self.phm_n for s in self.phm]

    def names(self) -> list[str]:
        """The bank tensors the graph takes, in its input order: spec order, then the kinds' tensors that
        are not pack tensors (per-n PHM branches) in registry order."""
        want = list(dict.fromkeys(n for k in KINDS for n in k.names(self)))
        s, chosen = spec(), set(want)
        return [n for n in s if n in chosen] + [n for n in want if n not in s]

    def union(self, other: "Layout") -> "Layout":
        return Layout(**{f.name: f.union(getattr(self, f.name), getattr(other, f.name)) for f in FIELDS})

    def covers(self, other: "Layout") -> bool:
        return self.union(other) == self

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        """A graph's layout from its backbone.json (a field it lacks: its default); one a kind refuses (PHM
        sites without `phm_n`: from before PHM slots per n, whose inputs take any one n, which no bank of
        this release feeds) is a CheckpointError, as is a field no kind declares."""
        for k in KINDS:
            k.check_dict(d)
        unknown = sorted(set(d) - {f.name for f in FIELDS})
        if unknown:
            raise CheckpointError(f"the graph's layout names slot kinds this release does not have: {unknown}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


FIELDS = tuple(f for k in KINDS for f in k.FIELDS)
Layout = dataclasses.make_dataclass(
    "Layout", [(f.name, type(f.default), dataclasses.field(default=f.default)) for f in FIELDS],
    bases=(_Layout,), frozen=True, namespace={"__module__": __name__, "__doc__": _Layout.__doc__})


def needs(t: dict, sizes: dict) -> Layout:
    """The slot kinds one pack uses: the smallest layout that gives its exact logits."""
    slots = [s for k in KINDS for s in k.slots(sizes)]
    return Layout(**{f: v for k in KINDS for f, v in k.needs(t, sizes, slots).items()})


def backbone_pack(dims: dict, pooling: str, normalize: bool) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The plain backbone as an embedding adapter (tensors, sizes): no slot filled (exact zeros, the prefix
    mask and the padded logit at their fills), C = 0, pooled and normalised as `pooling`, `normalize` say."""
    if pooling not in EMBED_POOLINGS:
        raise CheckpointError(f"backbone pooling {pooling!r} is not one of {', '.join(EMBED_POOLINGS)}")
    sizes = {k: 0 for k in size_keys()} | {k: dims[k] for k in FIXED} | {"n": 1}
    t = {k: np.full(resolve_shape(s, sizes), FILL.get(k, 0.0), np.float32) for k, s in spec().items()}
    t["head_cls"][...], t["head_max"][...] = float(pooling == "cls"), float(pooling == "max")
    t["head_norm"][...] = float(normalize)
    return t, sizes


def per_layer(name: str) -> bool:
    return symbols(name)[:1] == ("L",)


def input_names(layout: Layout, num_layers: int) -> list[str]:
    """Graph inputs for the bank: one tensor per layer for per-layer slots (`name.i`, [K, ...]), so a layer
    reads its own input and never slices a bigger one (a slice is a copy in onnxruntime)."""
    out = []
    for n in layout.names():
        out += [f"{n}.{i}" for i in range(num_layers)] if per_layer(n) else [n]
    return out
