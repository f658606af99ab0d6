"""What a slot kind declares (one module per kind, listed in slots/registry.py).

A slot kind is one building block of the shared layout: its pack tensors (shapes in symbols), the Layout
fields saying whether a graph has it, which bank tensors the graph then takes, and what one pack needs of
it (the serving path uses these, with no torch); how a trained model fills it (`sizes`, `pack`), its banked
forward in the shared graph (`kinds`: segmented kinds for exporters/segment.py; the layer hooks), and its
merge rule (`merge_*`; `MERGE` says it in words). torch is imported inside the torch-side methods only.

Every hook has a do-nothing default, so a kind implements only what it touches. Where the order of two
kinds' work matters for the numbers (a projection's bias, input, output, then additions; the residual's
sequential adapter, its branches, then parallel ones; merging BitFit before (IA)^3 before LoRA), the
hook names the stage, or the kind gives its position (RESIDUAL, MERGE_ORDER): the PyTorch modules' order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

NEG = float(np.finfo(np.float32).min)  # additive mask value / logit of a padded label


def ordered(a: tuple, b: tuple) -> tuple:
    """The union of two tuples, first-seen order."""
    return tuple(dict.fromkeys(a + b))


@dataclass(frozen=True)
class Field:
    """One Layout field (serialised under `name` in backbone.json's layout), its default and its union."""

    name: str
    default: Any = ()
    union: Callable[[Any, Any], Any] = ordered

    @staticmethod
    def flag(name: str) -> "Field":
        return Field(name, False, lambda a, b: a or b)

    @staticmethod
    def canonical(name: str, order: tuple) -> "Field":
        """A tuple kept in `order` (a union lists its members as `order` does)."""
        return Field(name, (), lambda a, b: tuple(x for x in order if x in a or x in b))

    @staticmethod
    def sorted(name: str) -> "Field":
        return Field(name, (), lambda a, b: tuple(sorted(set(a) | set(b))))


class SlotKind:
    """The defaults: a kind that declares nothing and does nothing."""

    name = ""
    FIELDS: tuple[Field, ...] = ()
    LEAD: tuple[str, ...] = ()  # spec tensors listed before every kind's others (the graphs' input order)
    FILL: dict[str, float] = {}  # tensors whose padding is not 0 (it must stay out of softmax / argmax)
    RESIDUAL = 0  # the position of `residual` in a sub-layer's residual (0 sequential, 1 its branches, 2 parallel)
    MERGE_ORDER = 0  # the position of `merge_layer` in a merged layer
    MERGE = "nothing to merge"  # the merge rule, in words
    EXAMPLE_SIZES: dict[str, int] = {}  # the sizes of the example bank graphs are traced on (default 2)
    FLAGS: tuple[str, ...] = ()  # name endings of the 0/1 tensors (the example bank draws them 0 or 1)
    BANK_MIN: dict[str, int] = {}  # sizes a bank keeps >= these (ONNX Reshape reads a 0 as "copy this dim")

    # ------------------------------------------------------------ the layout (no torch)
    def spec(self) -> dict[str, tuple]:
        """Pack tensors: their shapes in symbols (L layers, d hidden, f FFN; other names are sizes)."""
        return {}

    def names(self, layout) -> list[str]:
        """The bank tensors a graph of `layout` takes for this kind (spec names; others follow in this order)."""
        return []

    def slots(self, sizes: dict) -> list[tuple[str, str]]:
        """The slots a pack of `sizes` fills: (pack prefix, bank prefix) of each that has _scale/_gated/_act."""
        return []

    def needs(self, t: dict, sizes: dict, slots: list[tuple[str, str]]) -> dict:
        """The Layout fields one pack (tensors `t`, numpy or torch, compact) needs: {field: value}."""
        return {}

    def check_dict(self, d: dict) -> None:
        """Refuse a serialised layout (backbone.json) this release cannot serve (CheckpointError)."""

    # ------------------------------------------------------------ a trained model -> a pack (torch)
    def prepare(self, model) -> None:
        """Before packing: refuse what the layout cannot hold; bring the model to its packed form."""

    def sizes(self, model) -> dict[str, int]:
        return {}

    def pack(self, t: dict, model, sizes: dict) -> None:
        """Write the model's tensors into `t` (every spec tensor, at its fill)."""

    # ------------------------------------------------------------ the shared graph (torch)
    def kinds(self, layout, ex) -> list[tuple]:
        """Segmented kinds: (key, fn, bank names, example xs, frozen example weights); `ex` is build_kinds'
        example (ex.rand, ex.dim, ex.gm, ex.tm, ex.ln). Key `p` is run as `p.{layer}` and registered by
        its `{p}_scale`/`{p}_gated` (exporters/shared.py)."""
        return []

    # BankedLayer hooks, `bl` the layer (bl.t(name): its bank tensor [K, ...]; bl.index2 (B, 1) the rows)
    def linear_bias(self, bl, name: str, bias):
        return bias

    def linear_input(self, bl, name: str, x):
        return x

    def linear_output(self, bl, name: str, y):
        return y

    def linear_add(self, bl, name: str, y, x, ctx):
        return y

    def layer_norm_bias(self, bl, name: str, bias):
        return bias

    def ln_bias_inputs(self, layout, name: str) -> list[str]:
        """Bank tensors added to LayerNorm `name`'s bias (a segmented kind that runs that LayerNorm adds them)."""
        return []

    def prefix(self, bl, x, ctx):
        return None

    def prefix_attention(self, bl, q, k, v, pre, mask_add, scale):
        return None

    def residual(self, bl, site: str, out, h, a, ln, ctx):
        return out

    # ------------------------------------------------------------ merging (torch)
    def merge_model(self, m, fold_phm: bool) -> None:
        """Before the layers: whole-model steps (eject the prefix, fold PHM)."""

    def merge_layer(self, la, proj: dict) -> None:
        """Fold layer `la`'s slot into its projections `proj` (in place) where exact; what stays is kept as ops."""

    def merge_finish(self, m) -> None:
        """After the layers."""


def gate_spec(p: str, i: str) -> dict[str, tuple]:
    """The tensors of slot p's gate (UniPELT): flag, weight over input width i, bias."""
    return {f"{p}_gated": ("L",), f"{p}_gate_w": ("L", 1, i), f"{p}_gate_b": ("L", 1)}


GATE = ("_gated", "_gate_w", "_gate_b")


def gate_names(layout, p: str) -> list[str]:
    """Slot p's gate tensors if the graph has p gated."""
    return [p + g for g in GATE] if p in layout.gated else []


def gate_into(t: dict, p: str, i: int, gate) -> None:
    if gate is not None:
        t[f"{p}_gated"][i] = 1.0
        t[f"{p}_gate_w"][i] = gate.gate_weight.detach()
        t[f"{p}_gate_b"][i] = gate.gate_bias.detach()


def nonzero(t: dict, k: str) -> bool:
    """Whether pack tensor k is there and not all zeros (a compact pack lacks zero tensors)."""
    return k in t and bool((t[k] != 0).any())


def proj_dims(t: str) -> tuple[str, str]:
    """(in, out) size symbols of projection t."""
    return {"ffn_in": ("d", "f"), "ffn_out": ("f", "d")}.get(t, ("d", "d"))
