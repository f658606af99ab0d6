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

Packs are stored compactly: a pack file holds only the tensors that are not all their fill (zeros; the
prefix mask's and the padded logit's float32 min), so a LoRA's pack is its LoRA and head tensors, not the
union's slots; `complete` gives the missing ones back (packs written whole before stay readable). The
padding to the union and to the bank's sizes happens in the bank only.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import CheckpointError
from ..methods.config import BIAS_NAMES, IA3_INPUT, IA3_TARGETS, LORA_TARGETS, SITES

LAYOUT_VERSION = 1
ACTS = ("relu", "gelu", "gelu_new", "silu")  # the activations a bottleneck slot can select (one-hot)
NEG = float(np.finfo(np.float32).min)  # additive mask value / logit of a padded label
FIXED = ("L", "d", "f")  # the backbone's sizes: every pack of a graph has these
TASKS = ("classification", "embedding")
EMBED_POOLINGS = ("mean", "cls", "max")
BACKBONE = "@backbone"  # the plain backbone's embedding (reserved: NAME never matches it)
# tensors added to version 1 with embeddings: a pack written before has none of them and is a classifier
# (not max-pooled, not normalised), so they read as these values
OPTIONAL = {"head_max": 0.0, "head_norm": 0.0}


def _lora_dims(t: str) -> tuple[str, str]:
    return {"ffn_in": ("d", "f"), "ffn_out": ("f", "d")}.get(t, ("d", "d"))


@lru_cache(maxsize=1)
def spec() -> dict[str, tuple]:
    """Per pack tensor: its shape in symbols (L layers, d hidden, f FFN, named sizes padded across a bank)."""
    s: dict[str, tuple] = {"gate_masked": (), "head_cls": ()}
    for t in LORA_TARGETS:
        i, o = _lora_dims(t)
        s |= {f"lora_{t}_A": ("L", f"R_{t}", i), f"lora_{t}_B": ("L", o, f"R_{t}"), f"lora_{t}_scale": ("L",),
              f"lora_{t}_gated": ("L",), f"lora_{t}_gate_w": ("L", 1, i), f"lora_{t}_gate_b": ("L", 1)}
    s |= {"prefix_k": ("L", "P", "d"), "prefix_v": ("L", "P", "d"), "prefix_mask": ("L", "P"),
          "prefix_gated": ("L",), "prefix_gate_w": ("L", 1, "d"), "prefix_gate_b": ("L", 1)}
    for kind in ("seq", "par"):
        for site in SITES:
            p, w = f"{kind}_{site}", f"W_{kind}_{site}"
            s |= {f"{p}_down_w": ("L", w, "d"), f"{p}_down_b": ("L", w), f"{p}_up_w": ("L", "d", w),
                  f"{p}_up_b": ("L", "d"), f"{p}_scale": ("L",), f"{p}_act": ("L", len(ACTS)),
                  f"{p}_gated": ("L",), f"{p}_gate_w": ("L", 1, "d"), f"{p}_gate_b": ("L", 1)}
    for site in SITES:
        p, o = f"phm_{site}", f"O_{site}"
        s |= {f"seq_{site}_ln_before": ("L",), f"{p}_down_Wl": ("L", "n", "d/n", "r"), f"{p}_down_Wr": ("L", "n", "r", o),
              f"{p}_down_b": ("L", "n", o), f"{p}_up_Wl": ("L", "n", o, "r"), f"{p}_up_Wr": ("L", "n", "r", "d/n"),
              f"{p}_up_b": ("L", "d"), f"{p}_scale": ("L",), f"{p}_act": ("L", len(ACTS)), f"{p}_gated": ("L",),
              f"{p}_gate_w": ("L", 1, "d"), f"{p}_gate_b": ("L", 1)}
    s["phm_rule"] = ("n", "n", "n")
    for b in BIAS_NAMES:
        s[f"bitfit_{b}"] = ("L", "f" if b == "ffn_in" else "d")
    for t in IA3_TARGETS:  # (IA)^3: the scale less 1 (zero: no change), on the input (o, ffn_out) or output
        i, o = _lora_dims(t)
        s[f"ia3_{t}"] = ("L", i if t in IA3_INPUT else o)
    s |= {"head_dense_w": ("d", "d"), "head_dense_b": ("d",), "head_out_w": ("C", "d"), "head_out_b": ("C",)}
    s |= {"head_max": (), "head_norm": ()}  # embeddings output: max pooling, L2 normalisation (0/1)
    return s


def size_keys() -> tuple[str, ...]:
    """Every size a pack's json names (the symbols of spec())."""
    return tuple(dict.fromkeys(s for shape in spec().values() for s in shape
                               if isinstance(s, str) and s != "d/n"))


FILL = {"prefix_mask": NEG, "head_out_b": NEG}  # padding that must stay out of softmax / argmax
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
    out["r"] = max(out["r"], 1)
    out["C"] = max(out["C"], 1)  # a bank of embedding adapters only still has one (float32 min) logit column
    out |= {k: max(v, 1) for k, v in out.items() if k.startswith("O_")}
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
@dataclass(frozen=True)
class Layout:
    """The slot kinds a shared graph takes (the union over the adapters exported into it). A slot no
    adapter uses is left out of the graph entirely: an absent slot and an all-zero slot give the same
    logits, so packs never change; a new adapter that needs a new kind of slot re-exports the graph.
    PHM: a branch for each n in `phm_n` at each site in `phm`. `embeddings`: the graph has the `embeddings`
    output (and the head_max / head_norm inputs); graphs exported before it lack it, every new one has it."""

    lora: tuple[str, ...] = ()
    prefix: bool = False
    seq: tuple[str, ...] = ()
    phm: tuple[str, ...] = ()
    par: tuple[str, ...] = ()
    gated: tuple[str, ...] = ()
    acts: tuple[str, ...] = ()
    bitfit: bool = False
    phm_n: tuple[int, ...] = ()
    embeddings: bool = False
    ia3: tuple[str, ...] = ()

    def phm_prefixes(self) -> list[str]:
        """The PHM branches, `phm{n}_{site}`."""
        return [f"phm{n}_{s}" for n in self.phm_n for s in self.phm]

    def names(self) -> list[str]:
        """The bank tensors the graph takes, in its input order."""
        gate = ("_gated", "_gate_w", "_gate_b")
        scale = lambda p: [f"{p}_scale"] + ([f"{p}_act"] if len(self.acts) > 1 else [])  # noqa: E731
        want = ["head_cls", "head_dense_w", "head_dense_b", "head_out_w", "head_out_b"]
        want += ["gate_masked"] if self.gated else []
        want += ["head_max", "head_norm"] if self.embeddings else []
        for t in self.lora:
            want += [f"lora_{t}_A", f"lora_{t}_B", f"lora_{t}_scale"]
        want += ["prefix_k", "prefix_v", "prefix_mask"] if self.prefix else []
        for kind, sites in (("seq", self.seq), ("par", self.par)):
            for s in sites:
                want += [f"{kind}_{s}_{k}" for k in ("down_w", "down_b", "up_w", "up_b")] + scale(f"{kind}_{s}")
        want += [f"seq_{s}_ln_before" for s in SITES if s in self.seq or s in self.phm]
        want += [f"{p}{g}" for p in self.gated if not p.startswith("phm") for g in gate]
        want += [f"bitfit_{b}" for b in BIAS_NAMES] if self.bitfit else []
        want += [f"ia3_{t}" for t in self.ia3]
        out = [n for n in spec() if n in set(want)]
        for n in self.phm_n:  # per n: its branches, then its rule
            for p in (f"phm{n}_{s}" for s in SITES if s in self.phm):
                out += [f"{p}_{k}" for k in ("down_Wl", "down_Wr", "down_b", "up_Wl", "up_Wr", "up_b")] + scale(p)
                out += [f"{p}{g}" for g in gate] if p in self.gated else []
            out.append(f"phm{n}_rule")
        return out

    def union(self, other: "Layout") -> "Layout":
        u = lambda a, b: tuple(x for x in dict.fromkeys(a + b))  # noqa: E731
        return Layout(u(self.lora, other.lora), self.prefix or other.prefix, u(self.seq, other.seq),
                      u(self.phm, other.phm), u(self.par, other.par), u(self.gated, other.gated),
                      u(self.acts, other.acts), self.bitfit or other.bitfit,
                      tuple(sorted(set(self.phm_n) | set(other.phm_n))), self.embeddings or other.embeddings,
                      tuple(t for t in IA3_TARGETS if t in self.ia3 or t in other.ia3))

    def covers(self, other: "Layout") -> bool:
        return self.union(other) == self

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        """A graph's layout from its backbone.json; one written before PHM slots were per n (PHM sites, no
        `phm_n`) is refused: its PHM inputs take any one n, which no bank of this release feeds."""
        if d.get("phm") and "phm_n" not in d:
            raise CheckpointError("this shared graph predates PHM slots per n (its backbone.json has PHM sites "
                                  "but no phm_n): export an adapter into its folder again, or `hpeft deploy` "
                                  "an export, to re-export the graph")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def needs(t: dict, sizes: dict) -> Layout:
    """The slot kinds one pack uses: the smallest layout that gives its exact logits."""
    lora = tuple(x for x in LORA_TARGETS if sizes[f"R_{x}"] > 0)
    seq = tuple(s for s in SITES if sizes[f"W_seq_{s}"] > 0)
    par = tuple(s for s in SITES if sizes[f"W_par_{s}"] > 0)
    phm = tuple(s for s in SITES if sizes[f"O_{s}"] > 0 and sizes["r"] > 0)
    n = sizes["n"]
    slots = [f"lora_{x}" for x in lora] + (["prefix"] if sizes["P"] > 0 else []) + \
        [f"seq_{s}" for s in seq] + [f"par_{s}" for s in par] + [f"phm_{s}" for s in phm]
    named = lambda p: f"phm{n}_{p[4:]}" if p.startswith("phm_") else p  # noqa: E731  the bank's name
    nonzero = lambda k: k in t and bool((t[k] != 0).any())  # noqa: E731  a compact pack lacks zero tensors
    gated = tuple(named(p) for p in slots if nonzero(f"{p}_gated"))
    acts = tuple(a for j, a in enumerate(ACTS)
                 if any(bool((t[f"{p}_act"][..., j] != 0).any()) for p in slots if f"{p}_act" in t))
    bitfit = any(nonzero(f"bitfit_{b}") for b in BIAS_NAMES)
    embeddings = sizes["C"] == 0 or any(nonzero(k) for k in OPTIONAL)
    ia3 = tuple(x for x in IA3_TARGETS if nonzero(f"ia3_{x}"))
    return Layout(lora, sizes["P"] > 0, seq, phm, par, gated, acts, bitfit, (n,) if phm else (), embeddings, ia3)


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
