"""Named methods (presets.json) resolved into a MethodConfig for a given number of layers.

S4 (Chen et al., ICLR 2023): layers are split into four spindle-shaped groups G1..G4 (fewer layers at
the ends: 2-4-4-2 on 12 layers, 1-2-2-1 on 6), each group with its own set of strategies among
adapter (A), prefix (P), BitFit (B) and LoRA (L); the paper's S4-model is G1=(A,L) G2=(A,P) G3=(A,P,B)
G4=(P,B,L).
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError
from .config import COMPONENTS, MethodConfig, component_from_dict

SPINDLE = (1, 2, 2, 1)
STRATEGIES = ("adapter", "prefix", "bitfit", "lora")


@lru_cache(maxsize=1)
def presets() -> dict:
    data = json.loads((Path(__file__).with_name("presets.json")).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def method_names() -> list[str]:
    return list(presets())


def spindle_groups(num_layers: int) -> list[list[int]]:
    """Split layers 0..L-1 into 4 consecutive groups with sizes in proportion 1:2:2:1 (middle first on ties)."""
    w = sum(SPINDLE)
    sizes = [num_layers * s // w for s in SPINDLE]
    for g in (1, 2, 0, 3) * num_layers:
        if sum(sizes) == num_layers:
            break
        sizes[g] += 1
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out


def s4_components(groups: list[list[str]], strategies: dict, num_layers: int, overrides: dict) -> tuple:
    """One component per strategy, on the layers of the groups that use it."""
    layer_groups = spindle_groups(num_layers)
    comps = []
    for name in STRATEGIES:
        layers = [i for g, strat in zip(layer_groups, groups) if name in strat for i in g]
        if layers:
            comps.append(_apply(component_from_dict(dict(strategies[name])), overrides, keep_layers=tuple(layers)))
    return tuple(comps)


def resolve(method: str, num_layers: int, overrides: dict | None = None, s4_groups: list | None = None) -> MethodConfig:
    """The MethodConfig of a named method; `overrides` set fields of every component that has them."""
    p = presets()
    if method not in p:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(p)}")
    spec, overrides = p[method], dict(overrides or {})
    lr = float(overrides.pop("lr", spec["lr"]))
    gate_pooling = overrides.pop("gate_pooling", "masked")
    if "groups" in spec:
        groups = s4_groups or spec["groups"]
        _check_groups(groups)
        comps = s4_components(groups, spec["strategies"], num_layers, overrides)
        extra = {"groups": groups, "layer_groups": spindle_groups(num_layers)}
    else:
        comps = tuple(_apply(component_from_dict(dict(c)), overrides) for c in spec["components"])
        extra = {}
    _check_unused(overrides, comps)
    return MethodConfig(method, comps, gate_pooling, lr, extra)


def _apply(c, overrides: dict, keep_layers=None):
    names = {f.name for f in dataclasses.fields(c)}
    kw = {k: v for k, v in overrides.items() if k in names}
    if keep_layers is not None:
        kw["layers"] = keep_layers
    return component_from_dict({**dataclasses.asdict(c), **kw}) if kw else c


def _check_groups(groups) -> None:
    if not (isinstance(groups, list) and len(groups) == 4 and all(isinstance(g, list) for g in groups)):
        raise ConfigError("s4 groups must be a list of 4 lists of strategies")
    for g in groups:
        bad = [s for s in g if s not in STRATEGIES]
        if bad:
            raise ConfigError(f"s4 strategy {bad[0]!r} is unknown; allowed: {', '.join(STRATEGIES)}")


def _check_unused(overrides: dict, comps) -> None:
    known = {f.name for c in comps for f in dataclasses.fields(c)}
    unused = sorted(set(overrides) - known)
    if unused:
        allowed = sorted({f.name for cls in COMPONENTS.values() for f in dataclasses.fields(cls)} - {"type"})
        raise ConfigError(f"setting(s) {unused} do not apply to this method; settings: {allowed} and lr, gate_pooling")


def parse_overrides(items: list[str]) -> dict:
    """`KEY=VALUE` strings (VALUE parsed as JSON when it can be, else kept as a string)."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ConfigError(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
