"""LoRA per projection (q k v o ffn_in ffn_out): y + (x A^T B^T) * (alpha / r, or the gate), rank R_{t}.
Merge: an ungated LoRA folds into the weight, W <- W + (alpha / r) B A; a gated one is kept as ops."""

from __future__ import annotations

from ..methods.config import LORA_TARGETS
from .base import Field, SlotKind, gate_into, gate_names, gate_spec, proj_dims


class LoRA(SlotKind):
    name = "lora"
    FIELDS = (Field("lora"),)
    MERGE_ORDER = 2  # after BitFit and (IA)^3: their scale does not cover the LoRA update
    MERGE = "W <- W + (alpha / r) B A where ungated; a gated LoRA is kept as ops"

    def spec(self):
        s = {}
        for t in LORA_TARGETS:
            i, o = proj_dims(t)
            s |= {f"lora_{t}_A": ("L", f"R_{t}", i), f"lora_{t}_B": ("L", o, f"R_{t}"), f"lora_{t}_scale": ("L",)}
            s |= gate_spec(f"lora_{t}", i)
        return s

    def names(self, layout):
        return [n for t in layout.lora
                for n in [f"lora_{t}_A", f"lora_{t}_B", f"lora_{t}_scale"] + gate_names(layout, f"lora_{t}")]

    def slots(self, sizes):
        return [(f"lora_{t}", f"lora_{t}") for t in LORA_TARGETS if sizes[f"R_{t}"] > 0]

    def needs(self, t, sizes, slots):
        return {"lora": tuple(x for x in LORA_TARGETS if sizes[f"R_{x}"] > 0)}

    def sizes(self, model):
        ad = model.adapters
        return {f"R_{t}": max((la.lora[t].lora_A.shape[0] for la in ad.layers if t in la.lora), default=0)
                for t in LORA_TARGETS}

    def pack(self, t, model, sizes):
        for i, la in enumerate(model.adapters.layers):
            for name, lo in la.lora.items():
                r = lo.lora_A.shape[0]
                t[f"lora_{name}_A"][i, :r] = lo.lora_A
                t[f"lora_{name}_B"][i, :, :r] = lo.lora_B
                t[f"lora_{name}_scale"][i] = lo.scaling
                gate_into(t, f"lora_{name}", i, lo.gate)

    def kinds(self, layout, ex):
        out = []
        for t in layout.lora:
            fn, names = _banked(layout, t)
            i, o = proj_dims(t)
            out.append((f"lora_{t}", fn, names, [ex.rand(2, 3, ex.dim[o]), ex.rand(2, 3, ex.dim[i])] + ex.gm(f"lora_{t}")))
        return out

    def linear_add(self, bl, name, y, x, ctx):
        return bl._run(f"lora_{name}", y, [x], ctx) if name in bl.layout.lora else y

    def merge_layer(self, la, proj):
        for t in [t for t, lo in la.lora.items() if lo.gate is None]:
            proj[t].weight.copy_(la.lora[t].merged_weight(proj[t].weight))
            del la.lora[t]


def _banked(layout, t: str):
    from exporters.shared import Rows
    from ..methods import functional as Fn
    p = f"lora_{t}"
    names = [f"{p}_A", f"{p}_B", f"{p}_scale"] + gate_names(layout, p)

    def fn(y, x, *rest):  # y + (x A^T * (gate or scale)) B^T: the factor on the rank-r side, not on (R, S, out)
        r = Rows(dict(zip(names, rest[-1])), rest[-2], layout, rest[0] if len(rest) == 3 else None)
        down = Fn.linear(x, r.w(f"{p}_A")) * r.coef(p, x, r.col(f"{p}_scale"))
        return y + Fn.linear(down, r.w(f"{p}_B"))
    return fn, names


LORA = LoRA()
