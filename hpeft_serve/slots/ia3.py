"""(IA)^3 (Liu et al. 2022; peft's `ia3`; the PyTorch module is hpeft_serve/methods/ia3.py): a learned
per-channel scale of a frozen projection, on its output (q k v ffn_in, bias included) or its input (o,
ffn_out: the FFN's intermediate activation). Packed as the scale less 1, so an adapter without it is
zeros; the graph multiplies by 1 + it. Merge: exact, W <- W * l on rows (b <- b * l) or on columns; after
BitFit (the scale covers the delta) and before LoRA (it does not cover the LoRA update)."""

from __future__ import annotations

from ..methods.config import IA3_INPUT, IA3_TARGETS
from .base import Field, SlotKind, nonzero, proj_dims


class IA3(SlotKind):
    name = "ia3"
    FIELDS = (Field.canonical("ia3", IA3_TARGETS),)
    MERGE_ORDER = 1
    MERGE = "W <- W * l (rows, and b <- b * l; or columns for an input scale)"

    def spec(self):
        return {f"ia3_{t}": ("L", proj_dims(t)[0] if t in IA3_INPUT else proj_dims(t)[1]) for t in IA3_TARGETS}

    def names(self, layout):
        return [f"ia3_{t}" for t in layout.ia3]

    def needs(self, t, sizes, slots):
        return {"ia3": tuple(x for x in IA3_TARGETS if nonzero(t, f"ia3_{x}"))}

    def pack(self, t, model, sizes):
        for i, la in enumerate(model.adapters.layers):
            for name, scale in (la.ia3 or {}).items():
                t[f"ia3_{name}"][i] = scale - 1.0

    def _scale(self, bl, name):  # the row's scale, 1 + the pack's (B, 1, in or out)
        return 1.0 + bl.t(f"ia3_{name}")[bl.index2]

    def linear_input(self, bl, name, x):
        return x * self._scale(bl, name) if name in bl.layout.ia3 and name in IA3_INPUT else x

    def linear_output(self, bl, name, y):
        return y * self._scale(bl, name) if name in bl.layout.ia3 and name not in IA3_INPUT else y

    def merge_layer(self, la, proj):
        if la.ia3 is not None:
            from ..methods.ia3 import merge_into
            for name, scale in la.ia3.items():
                merge_into(name, proj[name], scale)
            la.ia3 = None


IA3_KIND = IA3()
