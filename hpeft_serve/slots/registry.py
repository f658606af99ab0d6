"""The slot kinds of the shared layout, in order: this order is the pack's tensor order and the graph's
input order (a kind's LEAD tensors first), so a new kind goes at the end. The layout
(hpeft_serve/pack/layout.py), packing (exporters/layout.py), the banked layer (exporters/shared.py) and
merging (exporters/merge.py) loop over KINDS."""

from __future__ import annotations

from .bitfit import BITFIT
from .bottleneck import PAR, SEQ
from .gates import GATES
from .head import HEAD
from .ia3 import IA3_KIND
from .lora import LORA
from .phm import PHM_KIND
from .prefix import PREFIX

KINDS = (GATES, LORA, PREFIX, SEQ, PAR, PHM_KIND, BITFIT, IA3_KIND, HEAD)


def ln_bias_inputs(layout, name: str) -> list[str]:
    """The bank tensors every kind adds to LayerNorm `name`'s bias."""
    return [n for k in KINDS for n in k.ln_bias_inputs(layout, name)]


def implementing(hook: str) -> list:
    """The kinds that implement BankedLayer / merge hook `hook`, in registry order."""
    from .base import SlotKind
    return [k for k in KINDS if getattr(type(k), hook) is not getattr(SlotKind, hook)]
