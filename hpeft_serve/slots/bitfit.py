"""BitFit: a delta on every frozen bias (the six projections' and both LayerNorms'), added to the bias as
the PyTorch module does. Merge: bias <- bias + delta (the same fp32 addition), first in a merged layer."""

from __future__ import annotations

from ..methods.config import BIAS_NAMES
from .base import Field, SlotKind, nonzero


class BitFit(SlotKind):
    name = "bitfit"
    FIELDS = (Field.flag("bitfit"),)
    MERGE_ORDER = 0
    MERGE = "bias <- bias + delta"

    def spec(self):
        return {f"bitfit_{b}": ("L", "f" if b == "ffn_in" else "d") for b in BIAS_NAMES}

    def names(self, layout):
        return [f"bitfit_{b}" for b in BIAS_NAMES] if layout.bitfit else []

    def needs(self, t, sizes, slots):
        return {"bitfit": any(nonzero(t, f"bitfit_{b}") for b in BIAS_NAMES)}

    def pack(self, t, model, sizes):
        for i, la in enumerate(model.adapters.layers):
            for name, delta in (la.bitfit or {}).items():
                t[f"bitfit_{name}"][i] = delta

    def linear_bias(self, bl, name, bias):  # the row's delta in the bias (B, 1, out)
        return bias + bl.t(f"bitfit_{name}")[bl.index2] if bl.layout.bitfit else bias

    layer_norm_bias = linear_bias

    def ln_bias_inputs(self, layout, name):
        return [f"bitfit_{name}"] if layout.bitfit else []

    def merge_layer(self, la, proj):
        if la.bitfit is not None:
            for name, delta in la.bitfit.items():
                proj[name].bias += delta
            la.bitfit = None


BITFIT = BitFit()
