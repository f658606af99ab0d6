"""PHM (Compacter) sequential adapters per site, one kind per n (the size of a pack's rule): down and up
projections H = sum_i kron(rule_i, W_left_i @ W_right_i) with rank r and block width O_{site}, the rule
`phm_rule` (n, n, n). A graph holds a branch `phm{n}_{site}` for each n in Layout.phm_n at each site in
Layout.phm; a pack fills the branch of its own n (the others are exact zeros). The branch shares the
sequential adapter's `seq_{site}_ln_before` flag (the dense kind's input rule) and adds to the residual
after the dense sequential adapter. Merge: kept as hpeft::PHMLinear, or folded into dense weights
(fold_phm)."""

from __future__ import annotations

from ..methods.config import SITES
from .base import Field, SlotKind, gate_into, gate_names, gate_spec
from .bottleneck import ACTS, ln_inputs, one_hot, scale_names, seq_input


class PHM(SlotKind):
    name = "phm"
    FIELDS = (Field("phm"), Field.sorted("phm_n"))
    RESIDUAL = 1  # after the dense sequential adapter, before the parallel one
    BANK_MIN = {"r": 1} | {f"O_{s}": 1 for s in SITES}
    FLAGS = ("_act", "_ln_before")
    EXAMPLE_SIZES = {"r": 1}
    MERGE = "kept as hpeft::PHMLinear, or folded into a dense weight H^T (fold_phm)"

    def spec(self):
        s = {}
        for site in SITES:
            p, o = f"phm_{site}", f"O_{site}"
            s |= {f"seq_{site}_ln_before": ("L",), f"{p}_down_Wl": ("L", "n", "d/n", "r"),
                  f"{p}_down_Wr": ("L", "n", "r", o), f"{p}_down_b": ("L", "n", o), f"{p}_up_Wl": ("L", "n", o, "r"),
                  f"{p}_up_Wr": ("L", "n", "r", "d/n"), f"{p}_up_b": ("L", "d"), f"{p}_scale": ("L",),
                  f"{p}_act": ("L", len(ACTS))} | gate_spec(p, "d")
        s["phm_rule"] = ("n", "n", "n")
        return s

    def names(self, layout):
        out = [f"seq_{s}_ln_before" for s in SITES if s in layout.phm]
        for n in layout.phm_n:  # per n: its branches, then its rule
            for p in (f"phm{n}_{s}" for s in SITES if s in layout.phm):
                out += [f"{p}_{k}" for k in ("down_Wl", "down_Wr", "down_b", "up_Wl", "up_Wr", "up_b")]
                out += scale_names(layout, p) + gate_names(layout, p)
            out.append(f"phm{n}_rule")
        return out

    def slots(self, sizes):
        return [(f"phm_{s}", f"phm{sizes['n']}_{s}") for s in SITES if sizes[f"O_{s}"] > 0 and sizes["r"] > 0]

    def needs(self, t, sizes, slots):
        phm = tuple(s for s in SITES if sizes[f"O_{s}"] > 0 and sizes["r"] > 0)
        return {"phm": phm, "phm_n": (sizes["n"],) if phm else ()}

    def check_dict(self, d):
        if d.get("phm") and "phm_n" not in d:
            from ..errors import CheckpointError
            raise CheckpointError("this shared graph predates PHM slots per n (its backbone.json has PHM sites "
                                  "but no phm_n): export an adapter into its folder again, or `hpeft deploy` "
                                  "an export, to re-export the graph")

    def sizes(self, model):
        ad = model.adapters
        out = {"n": ad.phm_rule.shape[0] if ad.phm_rule is not None else 1, "r": 0}
        for site in SITES:
            phms = [la.seq[site] for la in ad.layers if site in la.seq and la.seq[site].cfg.phm_n]
            out[f"O_{site}"] = max((b.adapter_down.phm_W_right.shape[2] for b in phms), default=0)
            out["r"] = max([out["r"]] + [b.adapter_down.phm_W_left.shape[2] for b in phms])
        return out

    def pack(self, t, model, sizes):
        ad = model.adapters
        for i, la in enumerate(ad.layers):
            for site, b in la.seq.items():
                if not b.cfg.phm_n:
                    continue
                p = f"phm_{site}"
                t[f"seq_{site}_ln_before"][i] = float(b.cfg.ln_before)
                down, up = b.adapter_down, b.adapter_up
                n, _, r = down.phm_W_left.shape
                o = down.phm_W_right.shape[2]
                t[f"{p}_down_Wl"][i, :, :, :r] = down.phm_W_left
                t[f"{p}_down_Wr"][i, :, :r, :o] = down.phm_W_right
                t[f"{p}_down_b"][i, :, :o] = down.bias.view(n, o)  # block-wise, so a wider bank pads each block
                t[f"{p}_up_Wl"][i, :, :o, :r] = up.phm_W_left
                t[f"{p}_up_Wr"][i, :, :r] = up.phm_W_right
                t[f"{p}_up_b"][i] = up.bias
                t[f"{p}_scale"][i] = b.scaling
                t[f"{p}_act"][i] = one_hot(b.cfg.activation)
                gate_into(t, p, i, b.gate)
        if ad.phm_rule is not None:
            t["phm_rule"] = ad.phm_rule.detach().clone()

    def kinds(self, layout, ex):
        out = []
        for n in layout.phm_n:
            for site in layout.phm:
                p = f"phm{n}_{site}"
                out.append((p, *_banked(layout, site, n, ex.eps), [ex.rand(2, 3, ex.dim["d"])] * 3 + ex.gm(p), ex.ln))
        return out

    def residual(self, bl, site, out, h, a, ln, ctx):
        for n in bl.layout.phm_n if site in bl.layout.phm else ():  # one branch per n: a row uses its n's
            out = bl._run(f"phm{n}_{site}", out, [h, a], ctx, (ln.weight, ln.bias))
        return out

    def merge_model(self, m, fold_phm):
        if fold_phm:
            _fold(m)


def _banked(layout, site: str, n: int, eps: float):
    from exporters.shared import Rows
    p = f"phm{n}_{site}"
    own = [f"{p}_{k}" for k in ("down_Wl", "down_Wr", "down_b", "up_Wl", "up_Wr", "up_b", "scale")]
    own.append(f"phm{n}_rule")
    own += [f"{p}_act"] if len(layout.acts) > 1 else []
    names = own + ln_inputs(layout, site) + gate_names(layout, p)

    def fn(out, h, a, *rest):  # out + the branch, on LN(h + a) or h per row
        ws = rest[-1]
        r = Rows(dict(zip(names, ws)), rest[-2], layout, rest[0] if len(rest) == 3 else None)
        return out + r.phm(p, n, seq_input(r, site, h + a, h, ws, eps))
    return fn, names


def _fold(m) -> None:
    from ..methods.bottleneck import DenseProj, PHMProj
    from ..methods.functional import phm_weight
    rule = m.adapters.phm_rule
    for la in m.adapters.layers:
        for b in la.seq.values():
            for attr in ("adapter_down", "adapter_up"):
                p = getattr(b, attr)
                if isinstance(p, PHMProj):
                    h = phm_weight(rule, p.phm_W_left, p.phm_W_right)  # (in, out)
                    dense = DenseProj(h.shape[0], h.shape[1], sparse=False)
                    dense.weight.copy_(h.t())
                    dense.bias.copy_(p.bias)
                    setattr(b, attr, dense)


PHM_KIND = PHM()
