"""The shared-backbone slot layout: what a pack is, with no torch (the serving path imports it).

One layout holds every method: per layer, LoRA on the six projections, prefix keys/values (with a mask),
a sequential and a parallel bottleneck adapter per site, a PHM (Compacter) sequential adapter per site,
gates, BitFit bias deltas; plus the head. A pack is one adapter's tensors in this layout (no K axis);
what an adapter lacks is exact zeros (zero-width ranks, masked prefix positions, zero deltas), and flags
(0/1) select per adapter what cannot be zero-padded: gated or scaled, LayerNorm before the sequential
adapter or not, the activation, the pooling, the gate pooling. A bank stacks packs on a new first axis
[K, ...], padding every size to the largest (ranks, prefix length, widths, labels) with exact zeros.
How a trained model becomes a pack (torch) is exporters/layout.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..methods.config import BIAS_NAMES, LORA_TARGETS, SITES

LAYOUT_VERSION = 1
ACTS = ("relu", "gelu", "gelu_new", "silu")  # the activations a bottleneck slot can select (one-hot)
NEG = float(np.finfo(np.float32).min)  # additive mask value / logit of a padded label


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
    s |= {"head_dense_w": ("d", "d"), "head_dense_b": ("d",), "head_out_w": ("C", "d"), "head_out_b": ("C",)}
    return s


FILL = {"prefix_mask": NEG, "head_out_b": NEG}  # padding that must stay out of softmax / argmax


def resolve_shape(symbols: tuple, sizes: dict) -> tuple[int, ...]:
    out = []
    for s in symbols:
        if isinstance(s, int):
            out.append(s)
        elif s == "d/n":
            out.append(sizes["d"] // sizes["n"])
        else:
            out.append(sizes[s])
    return tuple(out)


def bank_sizes(all_sizes: list[dict]) -> dict:
    """The sizes of a bank: the largest of each, one PHM n (packs without PHM adapt to it)."""
    fixed = {k: all_sizes[0][k] for k in ("L", "d", "f")}
    for s in all_sizes:
        if any(s[k] != v for k, v in fixed.items()):
            raise ValueError(f"packs for different backbones cannot share a bank: {fixed} vs {s}")
    ns = {s["n"] for s in all_sizes if s["r"] > 0}
    if len(ns) > 1:
        raise ValueError(f"PHM adapters with different n {sorted(ns)} cannot share a bank")
    out = {k: max(s[k] for s in all_sizes) for k in all_sizes[0]}
    out["n"] = ns.pop() if ns else 1
    # PHM sizes stay >= 1 (exact zeros): ONNX Reshape reads a 0 in a target shape as "copy this dim"
    out["r"] = max(out["r"], 1)
    out |= {k: max(v, 1) for k, v in out.items() if k.startswith("O_")}
    return out


def place(dst, src, name: str, pack_sizes: dict) -> None:
    """Write one pack tensor `src` into a bank slot `dst` (numpy array or torch tensor, bank sizes),
    padding with exact zeros (or the mask fill); a pack without PHM adapters gives zeros in the bank's n."""
    dst[...] = FILL.get(name, 0.0)
    if name.startswith("phm_") and pack_sizes["r"] == 0:
        dst[...] = 0.0
        return
    dst[tuple(slice(0, n) for n in src.shape)] = src


# ---------------------------------------------------------------- the slots a graph actually takes
@dataclass(frozen=True)
class Layout:
    """The slot kinds a shared graph takes (the union over the adapters exported into it). A slot no
    adapter uses is left out of the graph entirely: an absent slot and an all-zero slot give the same
    logits, so packs never change; a new adapter that needs a new kind of slot re-exports the graph."""

    lora: tuple[str, ...] = ()
    prefix: bool = False
    seq: tuple[str, ...] = ()
    phm: tuple[str, ...] = ()
    par: tuple[str, ...] = ()
    gated: tuple[str, ...] = ()
    acts: tuple[str, ...] = ()
    bitfit: bool = False

    def names(self) -> list[str]:
        """The bank tensors the graph takes, in its input order."""
        gate = ("_gated", "_gate_w", "_gate_b")
        want = ["head_cls", "head_dense_w", "head_dense_b", "head_out_w", "head_out_b"]
        want += ["gate_masked"] if self.gated else []
        for t in self.lora:
            want += [f"lora_{t}_A", f"lora_{t}_B", f"lora_{t}_scale"]
        want += ["prefix_k", "prefix_v", "prefix_mask"] if self.prefix else []
        for kind, sites in (("seq", self.seq), ("par", self.par), ("phm", self.phm)):
            for s in sites:
                want += [f"{kind}_{s}_{k}" for k in (("down_Wl", "down_Wr", "down_b", "up_Wl", "up_Wr", "up_b")
                                                     if kind == "phm" else ("down_w", "down_b", "up_w", "up_b"))]
                want += [f"{kind}_{s}_scale"] + ([f"{kind}_{s}_act"] if len(self.acts) > 1 else [])
        want += [f"seq_{s}_ln_before" for s in SITES if s in self.seq or s in self.phm]
        want += ["phm_rule"] if self.phm else []
        want += [f"{p}{g}" for p in self.gated for g in gate]
        want += [f"bitfit_{b}" for b in BIAS_NAMES] if self.bitfit else []
        return [n for n in spec() if n in set(want)]

    def union(self, other: "Layout") -> "Layout":
        u = lambda a, b: tuple(x for x in dict.fromkeys(a + b))  # noqa: E731
        return Layout(u(self.lora, other.lora), self.prefix or other.prefix, u(self.seq, other.seq),
                      u(self.phm, other.phm), u(self.par, other.par), u(self.gated, other.gated),
                      u(self.acts, other.acts), self.bitfit or other.bitfit)

    def covers(self, other: "Layout") -> bool:
        return self.union(other) == self

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def needs(t: dict, sizes: dict) -> Layout:
    """The slot kinds one pack (or bank) uses: the smallest layout that gives its exact logits."""
    lora = tuple(x for x in LORA_TARGETS if sizes[f"R_{x}"] > 0)
    seq = tuple(s for s in SITES if sizes[f"W_seq_{s}"] > 0)
    par = tuple(s for s in SITES if sizes[f"W_par_{s}"] > 0)
    phm = tuple(s for s in SITES if sizes[f"O_{s}"] > 0 and sizes["r"] > 0)
    slots = [f"lora_{x}" for x in lora] + (["prefix"] if sizes["P"] > 0 else []) + \
        [f"seq_{s}" for s in seq] + [f"par_{s}" for s in par] + [f"phm_{s}" for s in phm]
    gated = tuple(p for p in slots if bool((t[f"{p}_gated"] != 0).any()))
    acts = tuple(a for j, a in enumerate(ACTS)
                 if any(bool((t[f"{p}_act"][..., j] != 0).any()) for p in slots if f"{p}_act" in t))
    bitfit = any(bool((t[f"bitfit_{b}"] != 0).any()) for b in BIAS_NAMES)
    return Layout(lora, sizes["P"] > 0, seq, phm, par, gated, acts, bitfit)


def per_layer(name: str) -> bool:
    return spec()[name][:1] == ("L",)


def input_names(layout: Layout, num_layers: int) -> list[str]:
    """Graph inputs for the bank: one tensor per layer for per-layer slots (`name.i`, [K, ...]), so a layer
    reads its own input and never slices a bigger one (a slice is a copy in onnxruntime)."""
    out = []
    for n in layout.names():
        out += [f"{n}.{i}" for i in range(num_layers)] if per_layer(n) else [n]
    return out
