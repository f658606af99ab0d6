"""Bottleneck adapters per site (attn, ffn): sequential (Houlsby / Pfeiffer: on the sub-layer's output,
on LN(h + a) or h as the pack's `ln_before` flag says, replacing the residual by adapter + h + a) and
parallel (He et al.: beside the sub-layer, added), width W_{kind}_{site}, a scale, the activation one-hot
over ACTS (the graph selects per row only when its adapters use more than one: Layout.acts), an optional
gate. SparseAdapter's weights are packed pre-masked. Merge: kept as ops (sparse ones as their non-zeros)."""

from __future__ import annotations

from ..methods.config import SITES
from .base import Field, SlotKind, gate_into, gate_names, gate_spec

ACTS = ("relu", "gelu", "gelu_new", "silu")  # the activations a bottleneck slot can select (one-hot)


def scale_names(layout, p: str) -> list[str]:
    """A bottleneck slot's scale, and its activation one-hot when the graph selects per row."""
    return [f"{p}_scale"] + ([f"{p}_act"] if len(layout.acts) > 1 else [])


def one_hot(act: str):
    import torch
    act = {"swish": "silu"}.get(act, act)
    if act not in ACTS:
        from ..errors import ConfigError  # a ValueError too
        raise ConfigError(f"activation {act!r} cannot be served from the shared layout (supported: {ACTS}): "
                          "export this adapter with --merge")
    return torch.tensor([float(a == act) for a in ACTS])


def seq_input(r, site: str, ha, h, ws, eps: float):
    """The sequential adapter's input per row: LN(ha) (ha = h + a; with the sub-layer's LayerNorm, ws[-2:],
    and its bias deltas) where the pack's ln_before is 1, else h."""
    lnb = r.col(f"seq_{site}_ln_before")  # a 0/1 mix: onnxruntime's Where broadcast from (R, 1, 1) is far slower
    return lnb * r.layer_norm(f"{site}_ln", ha, ws[-2], ws[-1], eps) + (1.0 - lnb) * h


def ln_inputs(layout, site: str) -> list[str]:
    """What a sequential kind reads beside its own: the ln_before flag and the LayerNorm's bias deltas."""
    from .registry import ln_bias_inputs
    return [f"seq_{site}_ln_before"] + ln_bias_inputs(layout, f"{site}_ln")


class Bottleneck(SlotKind):
    """`kind` "seq" or "par": the dense bottleneck adapters of that kind at both sites."""

    MERGE = "not mergeable: kept as ops (SparseAdapter: its non-zeros, hpeft::SparseLinear)"
    FLAGS = ("_act", "_ln_before")
    EXAMPLE_SIZES = {f"W_{kind}_{site}": 4 for kind in ("seq", "par") for site in SITES}

    def __init__(self, kind: str):
        self.kind = self.name = kind
        self.RESIDUAL = 0 if kind == "seq" else 2  # sequential first, parallel last
        # the activations of every bottleneck slot (dense and PHM) are declared once, by the sequential kind
        self.FIELDS = (Field(kind),) + ((Field("acts"),) if kind == "seq" else ())

    def spec(self):
        s = {}
        for site in SITES:
            p, w = f"{self.kind}_{site}", f"W_{self.kind}_{site}"
            s |= {f"{p}_down_w": ("L", w, "d"), f"{p}_down_b": ("L", w), f"{p}_up_w": ("L", "d", w),
                  f"{p}_up_b": ("L", "d"), f"{p}_scale": ("L",), f"{p}_act": ("L", len(ACTS))} | gate_spec(p, "d")
        return s

    def names(self, layout):
        out = []
        for s in getattr(layout, self.kind):
            p = f"{self.kind}_{s}"
            out += [f"{p}_{k}" for k in ("down_w", "down_b", "up_w", "up_b")] + scale_names(layout, p)
            out += gate_names(layout, p) + ([f"seq_{s}_ln_before"] if self.kind == "seq" else [])
        return out

    def slots(self, sizes):
        return [(f"{self.kind}_{s}",) * 2 for s in SITES if sizes[f"W_{self.kind}_{s}"] > 0]

    def needs(self, t, sizes, slots):
        out = {self.kind: tuple(s for s in SITES if sizes[f"W_{self.kind}_{s}"] > 0)}
        if self.kind == "seq":
            out["acts"] = tuple(a for j, a in enumerate(ACTS)
                                if any(bool((t[f"{p}_act"][..., j] != 0).any()) for p, _ in slots if f"{p}_act" in t))
        return out

    def sizes(self, model):
        out = {}
        for site in SITES:
            blocks = [getattr(la, self.kind)[site] for la in model.adapters.layers if site in getattr(la, self.kind)]
            out[f"W_{self.kind}_{site}"] = max((b.adapter_down.weight.shape[0] for b in blocks
                                                if b is not None and not b.cfg.phm_n), default=0)
        return out

    def pack(self, t, model, sizes):
        for i, la in enumerate(model.adapters.layers):
            for site, b in getattr(la, self.kind).items():
                if b.cfg.phm_n:  # the PHM kind's
                    continue
                p = f"{self.kind}_{site}"
                if self.kind == "seq":
                    t[f"seq_{site}_ln_before"][i] = float(b.cfg.ln_before)
                down, up = b.adapter_down, b.adapter_up
                w = down.weight.shape[0]
                t[f"{p}_down_w"][i, :w] = down.masked_weight()  # SparseAdapter: pre-masked
                t[f"{p}_down_b"][i, :w] = down.bias
                t[f"{p}_up_w"][i, :, :w] = up.masked_weight()
                t[f"{p}_up_b"][i] = up.bias
                t[f"{p}_scale"][i] = b.scaling
                t[f"{p}_act"][i] = one_hot(b.cfg.activation)
                gate_into(t, p, i, b.gate)

    def kinds(self, layout, ex):
        out = []
        for site in getattr(layout, self.kind):
            p = f"{self.kind}_{site}"
            fn, names = (_seq if self.kind == "seq" else _par)(layout, site, ex.eps)
            d = ex.dim["d"]
            if self.kind == "seq":
                out.append((p, fn, names, [ex.rand(2, 3, d)] * 2 + ex.gm(p), ex.ln))
            else:
                out.append((p, fn, names, [ex.rand(2, 3, d)] * 2 + ex.gm(p)))
        return out

    def residual(self, bl, site, out, h, a, ln, ctx):
        if site not in getattr(bl.layout, self.kind):
            return out
        if self.kind == "seq":
            return bl._run(f"seq_{site}", out, [h], ctx, (ln.weight, ln.bias))  # out is h + a
        return bl._run(f"par_{site}", out, [a], ctx)

    def merge_finish(self, m):
        if self.kind == "seq":  # once for both kinds
            for p in m.adapters.sparse_projections():
                p.prepare_compact_export()


def _seq(layout, site: str, eps: float):
    from exporters.shared import Rows
    p = f"seq_{site}"
    own = [f"{p}_{k}" for k in ("down_w", "down_b", "up_w", "up_b", "scale")]
    own += [f"{p}_act"] if len(layout.acts) > 1 else []
    names = own + ln_inputs(layout, site) + gate_names(layout, p)

    def fn(out, h, *rest):  # out (the residual's h + a) + adapter: one Add, and LN(h + a) reads out
        ws = rest[-1]
        r = Rows(dict(zip(names, ws)), rest[-2], layout, rest[0] if len(rest) == 3 else None)
        return out + r.dense(p, seq_input(r, site, out, h, ws, eps))
    return fn, names


def _par(layout, site: str, eps: float):
    from exporters.shared import Rows
    p = f"par_{site}"
    own = [f"{p}_{k}" for k in ("down_w", "down_b", "up_w", "up_b", "scale")]
    names = own + ([f"{p}_act"] if len(layout.acts) > 1 else []) + gate_names(layout, p)

    def fn(out, a, *rest):
        r = Rows(dict(zip(names, rest[-1])), rest[-2], layout, rest[0] if len(rest) == 3 else None)
        return out + r.dense(p, a)
    return fn, names


SEQ, PAR = Bottleneck("seq"), Bottleneck("par")
