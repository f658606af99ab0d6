"""Method configurations: a method is a union of components (LoRA, prefix, bottleneck adapter, BitFit),
each on a set of layers. Presets (presets.json) name the hybrids of the papers; a checkpoint records the
resolved components, so loading never depends on a preset that may change.

Field docstrings are the help of `hpeft train --set KEY=VALUE` (read from this file's source by
`settings_help`, since Python keeps no attribute docstrings at run time).
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError

LORA_TARGETS = ("q", "k", "v", "o", "ffn_in", "ffn_out")
SITES = ("attn", "ffn")
MODES = ("sequential", "parallel")
INITS = ("bert", "mam", "houlsby")
PRUNERS = ("rand", "mag", "snip", "grasp")
GATE_POOLING = ("masked", "all")
BIAS_NAMES = ("q", "k", "v", "o", "ffn_in", "ffn_out", "attn_ln", "ffn_ln")  # what BitFit tunes, per layer
IA3_TARGETS = LORA_TARGETS
IA3_INPUT = ("o", "ffn_out")  # (IA)^3 scales these projections' input (ffn_out's: the FFN's intermediate activation)


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    """rank of the update"""
    alpha: float = 16.0
    """scaling numerator: the update is scaled by alpha / r (replaced by the gate when gated)"""
    targets: tuple[str, ...] = ("q", "v")
    """projections to adapt, among q k v o ffn_in ffn_out"""
    gate: bool = False
    """UniPELT gate: sigmoid gate (one per target) replaces alpha / r"""
    layers: tuple[int, ...] | None = None
    """layer indices (None: all)"""
    rslora: bool = False
    """rank-stabilised LoRA (Kalajdzievski 2023; peft use_rslora): scale by alpha / sqrt(r) instead of alpha / r"""
    type: str = "lora"


@dataclass(frozen=True)
class PrefixConfig:
    length: int = 30
    """number of prefix key/value vectors per layer"""
    bottleneck: int = 512
    """hidden size of the reparametrisation MLP used in training (0: train the vectors directly)"""
    gate: bool = False
    """UniPELT gate on the prefix keys and values"""
    layers: tuple[int, ...] | None = None
    """layer indices (None: all)"""
    shift_positions: bool = False
    """Hugging Face peft: the prefix is passed as past key/values, so token positions start after it"""
    type: str = "prefix"


@dataclass(frozen=True)
class BottleneckConfig:
    site: str = "ffn"
    """attn (after/beside self-attention) or ffn (after/beside the feed-forward block)"""
    mode: str = "sequential"
    """sequential (on the sub-layer output) or parallel (on the sub-layer input, added beside it)"""
    reduction_factor: float = 16.0
    """bottleneck = hidden_size // reduction_factor (unless bottleneck is set)"""
    bottleneck: int | None = None
    """bottleneck width; overrides reduction_factor"""
    activation: str = "relu"
    """non-linearity between the down and up projections: relu, gelu, gelu_new, silu, tanh, leakyrelu"""
    scaling: float = 1.0
    """the adapter output is multiplied by this (He et al.'s scaled parallel adapter: 4)"""
    ln_before: bool = True
    """sequential only: adapter input is LayerNorm(h + x) with the frozen LayerNorm (Pfeiffer) or h (Houlsby)"""
    gate: bool = False
    """UniPELT gate on the adapter output"""
    init: str = "bert"
    """bert: N(0, 0.02) both; mam: kaiming down, zero up; houlsby: truncated N(0, 0.01), zero biases"""
    phm_n: int = 0
    """PHM (Compacter): number of Kronecker summands n; 0 for dense projections"""
    phm_rank: int = 1
    """PHM: rank of the factorised W_i"""
    sparsity: float = 0.0
    """SparseAdapter: fraction of weights pruned at initialisation (global threshold; biases kept)"""
    pruner: str = "snip"
    """SparseAdapter pruning score: rand, mag, snip, grasp"""
    layers: tuple[int, ...] | None = None
    """layer indices (None: all)"""
    type: str = "adapter"

    def width(self, hidden: int) -> int:
        return self.bottleneck if self.bottleneck else max(1, int(hidden // self.reduction_factor))


@dataclass(frozen=True)
class BitFitConfig:
    layers: tuple[int, ...] | None = None
    """layers whose biases (q k v o ffn_in ffn_out and both LayerNorms) get trainable deltas"""
    type: str = "bitfit"


@dataclass(frozen=True)
class IA3Config:
    targets: tuple[str, ...] = ("k", "v", "ffn_out")
    """projections rescaled per channel: q k v ffn_in on their output, o ffn_out on their input (ffn_out's input is
    the FFN's intermediate activation)"""
    layers: tuple[int, ...] | None = None
    """layer indices (None: all)"""
    type: str = "ia3"


COMPONENTS = {"lora": LoRAConfig, "prefix": PrefixConfig, "adapter": BottleneckConfig, "bitfit": BitFitConfig,
              "ia3": IA3Config}
Component = LoRAConfig | PrefixConfig | BottleneckConfig | BitFitConfig | IA3Config


@dataclass(frozen=True)
class MethodConfig:
    method: str
    components: tuple[Component, ...]
    gate_pooling: str = "masked"
    """gates average over real tokens (masked) or over all positions incl. padding (all: AdapterHub)"""
    lr: float = 1e-3
    """learning rate of the adapter (the head uses the same)"""
    extra: dict = field(default_factory=dict)
    """method-level settings (e.g. the S4 group assignment) recorded for the user"""

    def to_dict(self) -> dict:
        return {"method": self.method, "gate_pooling": self.gate_pooling, "lr": self.lr, "extra": self.extra,
                "components": [component_to_dict(c) for c in self.components]}

    @classmethod
    def from_dict(cls, d: dict) -> "MethodConfig":
        if not isinstance(d, dict) or "components" not in d or "method" not in d:
            raise ConfigError("method config needs 'method' and 'components'")
        comps = tuple(component_from_dict(c) for c in d["components"])
        mc = cls(d["method"], comps, d.get("gate_pooling", "masked"), float(d.get("lr", 1e-3)), d.get("extra", {}))
        return mc


def component_to_dict(c: Component) -> dict:
    d = dataclasses.asdict(c)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def component_from_dict(d: dict) -> Component:
    if not isinstance(d, dict) or d.get("type") not in COMPONENTS:
        raise ConfigError(f"component type {d.get('type') if isinstance(d, dict) else d!r} is unknown; "
                          f"allowed: {', '.join(COMPONENTS)}")
    cls = COMPONENTS[d["type"]]
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - names)
    if bad:
        raise ConfigError(f"{d['type']} component: unknown field(s) {bad}; allowed: {sorted(names - {'type'})}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    return validate_component(cls(**kw))


def validate_component(c: Component) -> Component:
    """Check one component's fields; ValueError-style ConfigError naming the field and allowed values."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(f"{c.type}: {msg}")
    if isinstance(c, LoRAConfig):
        need(c.r >= 1, f"r must be >= 1, got {c.r}")
        need(bool(c.targets) and all(t in LORA_TARGETS for t in c.targets),
             f"targets {list(c.targets)} must be among {list(LORA_TARGETS)}")
    elif isinstance(c, IA3Config):
        need(bool(c.targets) and all(t in IA3_TARGETS for t in c.targets),
             f"targets {list(c.targets)} must be among {list(IA3_TARGETS)}")
    elif isinstance(c, PrefixConfig):
        need(c.length >= 1, f"length must be >= 1, got {c.length}")
        need(c.bottleneck >= 0, f"bottleneck must be >= 0, got {c.bottleneck}")
    elif isinstance(c, BottleneckConfig):
        need(c.site in SITES, f"site {c.site!r} must be one of {list(SITES)}")
        need(c.mode in MODES, f"mode {c.mode!r} must be one of {list(MODES)}")
        need(c.init in INITS, f"init {c.init!r} must be one of {list(INITS)}")
        need(c.pruner in PRUNERS, f"pruner {c.pruner!r} must be one of {list(PRUNERS)}")
        need(0.0 <= c.sparsity < 1.0, f"sparsity must be in [0, 1), got {c.sparsity}")
        need(c.phm_n >= 0 and c.phm_rank >= 1, "phm_n must be >= 0 and phm_rank >= 1")
        need(not (c.phm_n and c.sparsity), "a PHM adapter cannot also be sparse (phm_n and sparsity both set)")
        from .functional import ACTIVATIONS
        need(c.activation in ACTIVATIONS, f"activation {c.activation!r} must be one of {sorted(ACTIVATIONS)}")
    return c


def layers_of(c: Component, num_layers: int) -> tuple[int, ...]:
    if c.layers is None:
        return tuple(range(num_layers))
    bad = [i for i in c.layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{c.type}: layers {bad} out of range for a backbone with {num_layers} layers")
    return tuple(sorted(set(c.layers)))


@lru_cache(maxsize=1)
def settings_help() -> dict[str, str]:
    """KEY -> help for `--set KEY=VALUE`: the field docstrings of the components and of MethodConfig (the
    components that have the field in brackets, with its default)."""
    tree = ast.parse(Path(__file__).read_text())
    classes = {cls.__name__: cls for cls in (*COMPONENTS.values(), MethodConfig)}
    out: dict[str, list[str]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name in classes):
            continue
        cls, body = classes[node.name], node.body
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        where = getattr(cls, "type", "method")
        for field_node, doc in zip(body, body[1:]):
            if not (isinstance(field_node, ast.AnnAssign) and isinstance(doc, ast.Expr)
                    and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
                continue
            name = field_node.target.id
            if name in ("extra",):
                continue
            # a method-level default (lr) is the preset's, not the dataclass's: shown for components only
            shown = f", default {defaults[name]!r}" if cls is not MethodConfig else ""
            out.setdefault(name, []).append(f"[{where}{shown}] {doc.value.value}")
    return {k: "; ".join(dict.fromkeys(v)) for k, v in sorted(out.items())}
