"""A trained model as a pack of the shared layout (hpeft_serve/pack/layout.py), and packs stacked into a
bank of torch tensors (what the shared graph is traced and tested with). A pack holds only the tensors
that are not all their fill (compact); stacking pads what a pack leaves out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpeft_serve.pack.layout import (ACTS, FILL, LAYOUT_VERSION, Layout, bank_sizes, compact, input_names,  # noqa: F401
                                     needs, per_layer, place, resolve_shape, spec, split_n, symbols)
from hpeft_serve.methods.config import BIAS_NAMES, LORA_TARGETS, SITES

if TYPE_CHECKING:
    import torch

    from hpeft_serve.model import HybridModel


def _one_hot(act: str) -> "torch.Tensor":
    import torch
    act = {"swish": "silu"}.get(act, act)
    if act not in ACTS:
        from hpeft_serve.errors import ConfigError  # a ValueError too
        raise ConfigError(f"activation {act!r} cannot be served from the shared layout (supported: {ACTS}): "
                          "export this adapter with --merge")
    return torch.tensor([float(a == act) for a in ACTS])


def _gate_into(t: dict, p: str, i: int, gate) -> None:
    if gate is not None:
        t[f"{p}_gated"][i] = 1.0
        t[f"{p}_gate_w"][i] = gate.gate_weight.detach()
        t[f"{p}_gate_b"][i] = gate.gate_bias.detach()


def pack(model: "HybridModel") -> tuple[dict[str, "torch.Tensor"], dict[str, int]]:
    """One adapter's tensors in the shared layout, less those that are all their fill (a compact pack:
    hpeft_serve.pack.layout.complete gives them back), and its sizes (the symbols of spec())."""
    import torch
    with torch.no_grad():
        tensors, sizes = _pack(model)
    return compact(tensors), sizes


def _pack(model: "HybridModel") -> tuple[dict, dict]:
    import torch
    ad, ec = model.adapters, model.encoder.config
    if ad.position_offset:
        from hpeft_serve.errors import HpeftError
        raise HpeftError("this adapter shifts token positions by its prefix length (a Hugging Face peft prefix), "
                         "which the shared layout has no slot for: export it with --merge")
    ad.eject_prefix()
    L, d, f = ec.num_hidden_layers, ec.hidden_size, ec.intermediate_size
    sizes = {"L": L, "d": d, "f": f, "P": ad.prefix.length if ad.prefix is not None else 0,
             "n": ad.phm_rule.shape[0] if ad.phm_rule is not None else 1, "C": model.head.cfg.num_labels, "r": 0}
    for t in LORA_TARGETS:
        sizes[f"R_{t}"] = max((la.lora[t].lora_A.shape[0] for la in ad.layers if t in la.lora), default=0)
    for kind in ("seq", "par"):
        for site in SITES:
            slots = [getattr(la, kind)[site] for la in ad.layers if site in getattr(la, kind)]
            sizes[f"W_{kind}_{site}"] = max((b.adapter_down.weight.shape[0] for b in slots
                                             if b is not None and not b.cfg.phm_n), default=0)
    for site in SITES:
        phms = [la.seq[site] for la in ad.layers if site in la.seq and la.seq[site].cfg.phm_n]
        sizes[f"O_{site}"] = max((b.adapter_down.phm_W_right.shape[2] for b in phms), default=0)
        sizes["r"] = max([sizes["r"]] + [b.adapter_down.phm_W_left.shape[2] for b in phms])
    t = {k: torch.zeros(resolve_shape(s, sizes)) for k, s in spec().items()}
    for k, v in FILL.items():
        t[k].fill_(v)
    t["gate_masked"].fill_(float(ad.method_config.gate_pooling == "masked"))
    for i, la in enumerate(ad.layers):
        _pack_layer(t, i, la, ad, sizes)
    _pack_head(t, model)
    if ad.phm_rule is not None:
        t["phm_rule"] = ad.phm_rule.detach().clone()
    return t, sizes


def _pack_layer(t: dict, i: int, la, ad, sizes: dict) -> None:
    for name, lo in la.lora.items():
        r = lo.lora_A.shape[0]
        t[f"lora_{name}_A"][i, :r] = lo.lora_A
        t[f"lora_{name}_B"][i, :, :r] = lo.lora_B
        t[f"lora_{name}_scale"][i] = lo.scaling
        _gate_into(t, f"lora_{name}", i, lo.gate)
    if la.has_prefix:
        j = ad.prefix_layers.index(i)
        t["prefix_k"][i], t["prefix_v"][i] = ad.prefix.prefix_kv[j, 0], ad.prefix.prefix_kv[j, 1]
        t["prefix_mask"][i] = 0.0
        _gate_into(t, "prefix", i, la.prefix_gate)
    for kind in ("seq", "par"):
        for site, b in getattr(la, kind).items():
            if kind == "seq":
                t[f"seq_{site}_ln_before"][i] = float(b.cfg.ln_before)
            p = f"phm_{site}" if b.cfg.phm_n else f"{kind}_{site}"
            (_pack_phm if b.cfg.phm_n else _pack_dense)(t, p, i, b)
            t[f"{p}_scale"][i] = b.scaling
            t[f"{p}_act"][i] = _one_hot(b.cfg.activation)
            _gate_into(t, p, i, b.gate)
    if la.bitfit is not None:
        for name, delta in la.bitfit.items():
            t[f"bitfit_{name}"][i] = delta
    if la.ia3 is not None:  # stored less 1, so an adapter without it is zeros (the graph multiplies by 1 + it)
        for name, scale in la.ia3.items():
            t[f"ia3_{name}"][i] = scale - 1.0


def _pack_dense(t: dict, p: str, i: int, b) -> None:
    down, up = b.adapter_down, b.adapter_up
    w = down.weight.shape[0]
    t[f"{p}_down_w"][i, :w] = down.masked_weight()  # SparseAdapter: pre-masked
    t[f"{p}_down_b"][i, :w] = down.bias
    t[f"{p}_up_w"][i, :, :w] = up.masked_weight()
    t[f"{p}_up_b"][i] = up.bias


def _pack_phm(t: dict, p: str, i: int, b) -> None:
    down, up = b.adapter_down, b.adapter_up
    n, _, r = down.phm_W_left.shape
    o = down.phm_W_right.shape[2]
    t[f"{p}_down_Wl"][i, :, :, :r] = down.phm_W_left
    t[f"{p}_down_Wr"][i, :, :r, :o] = down.phm_W_right
    t[f"{p}_down_b"][i, :, :o] = down.bias.view(n, o)  # block-wise, so a wider bank pads each block
    t[f"{p}_up_Wl"][i, :, :o, :r] = up.phm_W_left
    t[f"{p}_up_Wr"][i, :, :r] = up.phm_W_right
    t[f"{p}_up_b"][i] = up.bias


def _pack_head(t: dict, model: "HybridModel") -> None:
    """A classifier's dense and output layers; an embedding head's pooling and normalisation flags (its head
    tensors stay zeros, C = 0)."""
    h = model.head
    c = h.cfg.num_labels
    t["head_cls"].fill_(float(h.cfg.pooling == "cls"))
    if h.cfg.embedding:
        t["head_max"].fill_(float(h.cfg.pooling == "max"))
        t["head_norm"].fill_(float(h.cfg.normalize))
        return
    t["head_dense_w"], t["head_dense_b"] = h.dense.weight.detach().clone(), h.dense.bias.detach().clone()
    t["head_out_w"][:c], t["head_out_b"][:c] = h.out_proj.weight, h.out_proj.bias


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
