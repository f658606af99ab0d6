"""Gates (UniPELT): a sigmoid gate per slot, over the slot's input pooled over tokens, replaces the slot's
scale where the adapter is gated. Each gated kind declares its own gate tensors (base.gate_spec); this
kind holds what they share: which slots a graph has gated (Layout.gated, bank names: a PHM branch's is
`phm{n}_{site}`) and the pooling flag `gate_masked` (average over real tokens, or over every position).
Merging keeps a gated slot as ops (its value depends on the input)."""

from __future__ import annotations

from .base import Field, SlotKind, nonzero


class Gates(SlotKind):
    name = "gates"
    FIELDS = (Field("gated"),)
    LEAD = ("gate_masked",)
    FLAGS = ("_gated", "gate_masked")
    MERGE = "not mergeable: a gated slot is kept as ops"

    def spec(self):
        return {"gate_masked": ()}

    def names(self, layout):
        return ["gate_masked"] if layout.gated else []

    def needs(self, t, sizes, slots):
        return {"gated": tuple(bank for p, bank in slots if nonzero(t, f"{p}_gated"))}

    def pack(self, t, model, sizes):
        t["gate_masked"].fill_(float(model.adapters.method_config.gate_pooling == "masked"))


GATES = Gates()
