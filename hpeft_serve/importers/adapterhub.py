"""Import AdapterHub `adapters` 1.x checkpoints (and adapter-transformers' older form) exactly.

A checkpoint folder is what `model.save_adapter(dir, name)` writes: `adapter_config.json` and
`adapter.safetensors` or `pytorch_adapter.bin` (read without unpickling code), plus `head_config.json` and
`model_head.safetensors` / `pytorch_model_head.bin`. Supported: bottleneck adapters (SeqBn, DoubleSeqBn, ParBn,
Compacter, Compacter++: dense or PHM, gated or not, fixed or learned scaling, per-layer reduction factors),
prefix tuning (MLP or flat; ejected at import), LoRA (q k v, intermediate, output; gated or scaled) and
unions of them (MAM, UniPELT); flex classification heads and the *ForSequenceClassification heads. An
adapter saved without a head (`with_head=False`, or a model that had none: SPECTER2's adapters) or with a head
that is not a classifier (tagging, question answering, ...; ignored, with a note) is an embedding adapter.

The library's quirks are reproduced, not corrected (shared/research/methods.md section 2):
- gates are the mean of a sigmoid over every position, padding included (gate_pooling=all);
- a gate replaces LoRA's alpha / r; Pfeiffer/SeqBn adapters see LN(h + x) and that LayerNorm runs twice;
- PHM weights are (in, out), one rule per adapter shared by every layer and both projections;
- prefix tensors are stored once per layer as aliases (all copies must agree), and a 1-D `control_trans` is
  a flat prefix whatever the config says (an ejected prefix is saved with "flat": false);
- versions before 1.1.0 ignored LoRA's alpha (scaling 1.0): their LoRAs are imported with alpha = r;
  configs without a version (adapter-transformers) name tanh-GELU "gelu" and store weights under
  `*_text_task_adapters`; their unused invertible-adapter settings are dropped as the library drops them.
Any option whose forward we do not model is refused, naming it.

QUIRKS per family (adapters 1.3.0 on transformers 4.57; peft 0.21.2), checked against the golden fixtures
(tests/golden, tests/test_import_families.py). Families: bert, roberta, xlm-roberta, electra, distilbert,
deberta-v2 (DeBERTa-v3 is deberta-v2); the key paths of each are the PATHS table below.

- electra: BERT's paths under `electra.`; nothing differs (`embeddings_project`, embedding size != hidden,
  takes no adapter).
- distilbert: `distilbert.transformer.layer.N.{attention_adapters,output_adapters}`, LoRA on
  `attention.{q,k,v}_lin` and `ffn.lin1/lin2`, prefix location key `self` (not `self_prefix`). Prefix tuning
  (prefix, MAM, UniPELT, unions with a prefix) is REFUSED: DistilBERT runs SDPA attention by default, and
  adapters appends the prefix's mask of ones to SDPA's additive float mask, so every prefix score gets +1 in
  a batch with padding and nothing in one without (transformers passes no mask then; the eager attention
  adds nothing). Its outputs depend on the batch: no import can be exact.
- deberta-v2: `deberta.encoder.layer.N...`, LoRA on `attention.self.{query,key,value}_proj`. With
  share_att_key the relative embeddings go through the LoRA'd query/key projections too (a gated LoRA's gate
  is then the mean over the 2A relative positions); prefix keys get no c2p/p2c term (adapters zero-pads the
  relative scores); DeBERTa masks (query, key) pairs, so a padding position attends to every position (with
  a prefix: to the prefix alone), which reaches the logits through gates pooled over every position. The
  encoder does the same (encoder_deberta.py).
- heads: flex classification heads as for BERT (first token, dense + tanh + linear). The families' Hugging
  Face *ForSequenceClassification heads are not dense + tanh (DistilBERT pre_classifier + ReLU, ELECTRA
  dense + GELU, DeBERTa ContextPooler: dense + pooler_hidden_act, GELU): REFUSED by name (adapters.init on
  those models, peft SEQ_CLS: common.OTHER_HEADS). Adapters saved without a head import as embedding adapters.

peft on these families (importers/peft.py): LoRA on any projection (DistilBERT's q_lin/k_lin/v_lin/out_lin/
lin1/lin2, DeBERTa's query_proj/key_proj/value_proj) of the bare encoder (FEATURE_EXTRACTION) imports; peft
prefix tuning is refused (past key/values: DistilBERT's and DeBERTa-v2's attention take none).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..backbone import Backbone
from ..errors import CheckpointError
from ..methods.config import BottleneckConfig, LoRAConfig, MethodConfig, PrefixConfig
from ..methods.functional import ACTIVATIONS
from ..model import HeadConfig
from .common import (
    Imported,
    check_float,
    labels_of,
    read_json,
    read_weights,
    static_head,
    take,
)

BASE = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "electra": "electra",
        "distilbert": "distilbert", "deberta-v2": "deberta"}
LEGACY_KEYS = {"attention_text_task_adapters": "adapters", "attention_text_lang_adapters": "adapters",
               "layer_text_task_adapters": "adapters", "layer_text_lang_adapters": "adapters",
               "invertible_lang_adapters": "invertible_adapters"}
LEGACY_ACTS = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # adapter-transformers' names, for configs without version
ACTS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "swish": "silu",
        "silu": "silu", "tanh": "tanh", "leakyrelu": "leakyrelu"}
# where each family's adapters sit, under its base-model prefix (see QUIRKS): the layer list, the two bottleneck
# sites, the LoRA'd projections, the prefix gates and the prefix pool's location key
BERT_PATHS = {"layers": "encoder.layer", "attn": "attention.output", "ffn": "output",
              "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
              "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
              "prefix_gates": "attention.self.prefix_tuning.prefix_gates", "prefix_location": "self_prefix"}
PATHS = {"bert": BERT_PATHS, "roberta": BERT_PATHS, "xlm-roberta": BERT_PATHS, "electra": BERT_PATHS,
         "distilbert": {"layers": "transformer.layer", "attn": "attention_adapters", "ffn": "output_adapters",
                        "q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "ffn_in": "ffn.lin1",
                        "ffn_out": "ffn.lin2", "prefix_gates": "attention.prefix_tuning.prefix_gates",
                        "prefix_location": "self"},
         "deberta-v2": BERT_PATHS | {"q": "attention.self.query_proj", "k": "attention.self.key_proj",
                                    "v": "attention.self.value_proj"}}
# flex head types that are classifiers: "classification" is imported, the others are refused by their options;
# any other head (tagging, question answering, language modelling, ...) is ignored: an embedding import
CLASSIFIER_HEADS = ("classification", "multilabel_classification", "image_classification")

# The fields of each config class with their defaults; the second set holds what has no effect at inference
# (initialisation, dropout, options for models we do not import) and is accepted whatever its value.
BN = dict(original_ln_before=False, original_ln_after=True, ln_before=False, ln_after=False, is_parallel=False,
          scaling=1.0, use_gating=False, residual_before_ln=True, adapter_residual_before_ln=False, inv_adapter=None,
          inv_adapter_reduction_factor=None, leave_out=[], phm_layer=False, phm_dim=4, factorized_phm_W=True,
          shared_W_phm=False, shared_phm_rule=True, factorized_phm_rule=False, phm_rank=1, phm_bias=True,
          mh_adapter=None, output_adapter=None, reduction_factor=None, non_linearity=None, architecture=None)
BN_IGNORED = {"init_weights", "init_weights_seed", "dropout", "cross_adapter", "phm_c_init", "phm_init_range",
              "learn_phm", "hypercomplex_nonlinearity", "stochastic_depth"}
PREFIX = dict(leave_out=[], flat=False, prefix_length=30, bottleneck_size=512, non_linearity="tanh",
              use_gating=False, shared_gating=True, architecture="prefix_tuning")
PREFIX_IGNORED = {"encoder_prefix", "cross_prefix", "dropout", "init_weights_seed"}  # encoder-only: self_prefix
LORA = dict(selfattn_lora=True, intermediate_lora=False, output_lora=False, leave_out=[], r=8, alpha=8,
            attn_matrices=["q", "v"], composition_mode="add", use_gating=False, use_dora=False, vera_d=None,
            vera_b=None, dtype=None, architecture="lora")
LORA_IGNORED = {"dropout", "init_weights", "init_weights_seed"}


class _Source:
    """The state of one import: the remaining source tensors (keys without the base-model prefix)."""

    def __init__(self, tensors: dict, name: str, folder: Path, L: int, d: int, f: int, model_type: str):
        self.t, self.name, self.origin, self.L, self.d, self.f = tensors, name, str(folder), L, d, f
        self.paths, self.model_type = PATHS[model_type], model_type
        self.out: dict[str, torch.Tensor] = {}

    def at(self, i: int, part: str) -> str:
        """The saved key prefix of `part` (a PATHS entry) in layer i."""
        return f"{self.paths['layers']}.{i}.{self.paths[part]}."

    def take(self, key: str, shape: tuple) -> torch.Tensor:
        return take(self.t, key, shape, self.origin)

    def refuse(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.origin}: {what}; it is not imported (an approximate import would change the "
                               "outputs)")


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _fields(c: dict, defaults: dict, ignored: set, kind: str, src: _Source) -> dict:
    unknown = sorted(set(c) - set(defaults) - ignored - {"invertible_adapter"})
    if unknown:
        raise src.refuse(f"{kind} config option(s) {unknown} are not modelled")
    return {**defaults, **{k: v for k, v in c.items() if k not in ignored}}


def _need(ok: bool, src: _Source, what: str) -> None:
    if not ok:
        raise src.refuse(what)


def _act(name, src: _Source) -> str:
    a = ACTS.get(str(name).lower())
    _need(a is not None and a in ACTIVATIONS, src, f"activation {name!r} is not supported (supported: {sorted(ACTS)})")
    return a


def _layers(leave_out, src: _Source) -> tuple[int, ...]:
    return tuple(i for i in range(src.L) if i not in set(leave_out or []))


# ---------------------------------------------------------------- bottleneck adapters
def _bottleneck(c: dict, src: _Source, meta: dict) -> list:
    c = _fields(c, BN, BN_IGNORED, "bottleneck", src)
    if c.get("invertible_adapter"):  # adapter-transformers v1 nested the invertible adapter's settings
        c["inv_adapter"] = c["invertible_adapter"].get("block_type")
    _need(c["architecture"] in (None, "bottleneck"), src, f"architecture {c['architecture']!r}")
    for k in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity"):
        _need(c[k] is not None, src, f"bottleneck config lacks {k!r}")
    _need(c["original_ln_after"] is True, src, "original_ln_after=False (no residual + LayerNorm after the adapter)")
    _need(not c["ln_before"] and not c["ln_after"], src, "ln_before/ln_after (the adapter's own LayerNorms)")
    if not c["is_parallel"] and c["original_ln_before"]:
        _need(c["residual_before_ln"] is True, src, f"residual_before_ln={c['residual_before_ln']!r} with "
              "original_ln_before=True")
    if c["inv_adapter"] is not None:
        has = any("invertible_adapters" in k for k in src.t)
        _need(not has and meta.get("type") == "text_task", src, f"invertible adapter {c['inv_adapter']!r}")
    _need(c["scaling"] == "learned" or isinstance(c["scaling"], (int, float)), src, f"scaling={c['scaling']!r}")
    if c["phm_layer"]:
        _need(c["factorized_phm_W"] and not c["shared_W_phm"] and c["shared_phm_rule"], src,
              "PHM with factorized_phm_W=False, shared_W_phm=True or shared_phm_rule=False")
        _phm_rule(c, src)
    act, gate = _act(c["non_linearity"], src), bool(c["use_gating"])
    comps = []
    for site, flag in (("attn", "mh_adapter"), ("ffn", "output_adapter")):
        if not c[flag]:
            continue
        groups: dict[tuple, list[int]] = {}
        for i in _layers(c["leave_out"], src):
            width, scaling = _bottleneck_layer(c, src, site, i, gate)
            groups.setdefault((width, scaling), []).append(i)
        for (width, scaling), layers in groups.items():
            comps.append(BottleneckConfig(site=site, mode="parallel" if c["is_parallel"] else "sequential",
                                          bottleneck=width, activation=act, scaling=scaling,
                                          ln_before=bool(c["original_ln_before"]) and not c["is_parallel"],
                                          gate=gate, phm_n=c["phm_dim"] if c["phm_layer"] else 0,
                                          phm_rank=c["phm_rank"], layers=tuple(layers)))
    return comps


def _width(rf, i: int, d: int, src: _Source) -> int:
    if isinstance(rf, dict):
        _need(str(i) in rf or "default" in rf, src, f"reduction_factor {rf} has no value for layer {i} and no default")
        rf = rf.get(str(i), rf.get("default"))
    return max(1, int(d // rf))


def _bottleneck_layer(c: dict, src: _Source, site: str, i: int, gate: bool) -> tuple[int, float]:
    d, w = src.d, _width(c["reduction_factor"], i, src.d, src)
    p, q = f"{src.at(i, site)}adapters.{src.name}.", f"layers.{i}.{'par' if c['is_parallel'] else 'seq'}.{site}."
    o = src.out
    if c["phm_layer"]:
        n, r = c["phm_dim"], c["phm_rank"]
        _need(d % n == 0 and w % n == 0, src, f"PHM n={n} does not divide hidden {d} and bottleneck {w}")
        for proj, (i_, o_) in (("adapter_down.0.", (d, w)), ("adapter_up.", (w, d))):
            ours = q + proj.split(".")[0] + "."
            o[ours + "phm_W_left"] = src.take(p + proj + "W_left", (n, i_ // n, r))
            o[ours + "phm_W_right"] = src.take(p + proj + "W_right", (n, r, o_ // n))
            o[ours + "bias"] = src.take(p + proj + "b", (o_,)) if c["phm_bias"] else torch.zeros(o_)
    else:
        o[q + "adapter_down.weight"] = src.take(p + "adapter_down.0.weight", (w, d))
        o[q + "adapter_down.bias"] = src.take(p + "adapter_down.0.bias", (w,))
        o[q + "adapter_up.weight"] = src.take(p + "adapter_up.weight", (d, w))
        o[q + "adapter_up.bias"] = src.take(p + "adapter_up.bias", (d,))
    if gate:
        o[q + "gate.gate_weight"] = src.take(p + "gate.weight", (1, d))
        o[q + "gate.gate_bias"] = src.take(p + "gate.bias", (1,))
    scaling = c["scaling"]
    if scaling == "learned":  # a learned scalar per layer: exact as a float (fp32 -> double -> fp32)
        scaling = src.take(p + "scaling", (1,)).item()
    return w, float(scaling)


def _phm_rule(c: dict, src: _Source) -> None:
    n, p = c["phm_dim"], f"shared_parameters.{src.name}."
    if "phm_rule" in src.out:
        return
    if c["factorized_phm_rule"]:  # rule = left @ right: one product per entry, exact
        rule = torch.bmm(src.take(p + "phm_rule_left", (n, n, 1)), src.take(p + "phm_rule_right", (n, 1, n)))
    else:
        rule = src.take(p + "phm_rule", (n, n, n))
    src.out["phm_rule"] = rule


# ---------------------------------------------------------------- prefix tuning
def _prefix(c: dict, src: _Source) -> list:
    c = _fields(c, PREFIX, PREFIX_IGNORED, "prefix_tuning", src)
    _need(src.model_type != "distilbert", src, "prefix tuning on DistilBERT: adapters 1.3.0 runs it in DistilBERT's "
          "SDPA attention, which appends the prefix's mask of ones to an additive float mask, so every prefix score "
          "gets +1 in a batch with padding and nothing in one without (the outputs depend on the batch)")
    _need(c["shared_gating"] is True, src, "prefix tuning with shared_gating=False (separate key and value gates)")
    layers, d, length = _layers(c["leave_out"], src), src.d, int(c["prefix_length"])
    pool = _prefix_pool(src)
    n = len(layers)
    if "control_trans" in pool:  # flat (also an ejected prefix saved with "flat": false)
        kv = pool.pop("control_trans")
        _need(kv.dim() == 1 and kv.numel() == length * n * 2 * d, src,
              f"flat prefix of {kv.numel()} values does not fit length {length} x {n} layers x 2 x {d}")
    else:
        emb = pool.pop("wte.weight")
        _need(tuple(emb.shape) == (length, d), src, f"prefix embedding shape {tuple(emb.shape)} != {(length, d)}")
        h = ACTIVATIONS[_act(c["non_linearity"], src)](
            torch.nn.functional.linear(emb, pool.pop("control_trans.0.weight"), pool.pop("control_trans.0.bias")))
        w2 = pool.pop("control_trans.2.weight")
        _need(w2.shape[0] == n * 2 * d, src, f"the prefix MLP gives {w2.shape[0]} values per position, not "
              f"{n} layers x 2 x {d}: the adapter was trained on a different backbone")
        kv = torch.nn.functional.linear(h, w2, pool.pop("control_trans.2.bias"))
    _need(not pool, src, f"unexpected prefix tensors {sorted(pool)}")
    src.out["prefix.prefix_kv"] = kv.reshape(length, n, 2, d).permute(1, 2, 0, 3).contiguous()  # (n, 2, P, d)
    gate = bool(c["use_gating"])
    if gate:
        for i in layers:
            p = f"{src.at(i, 'prefix_gates')}{src.name}."
            src.out[f"layers.{i}.prefix_gate.gate_weight"] = src.take(p + "weight", (1, d))
            src.out[f"layers.{i}.prefix_gate.gate_bias"] = src.take(p + "bias", (1,))
    return [PrefixConfig(length=length, bottleneck=0, gate=gate, layers=layers)]


def _prefix_pool(src: _Source) -> dict[str, torch.Tensor]:
    """The pool's tensors, stored once at `prefix_tuning.` and again under every layer: the copies must agree."""
    mark = f"prefix_tunings.{src.name}.{src.paths['prefix_location']}."
    found: dict[str, torch.Tensor] = {}
    for k in [k for k in src.t if mark in k]:
        suffix, t = k.split(mark, 1)[1], src.t.pop(k)
        if suffix in found and not torch.equal(found[suffix], t):
            raise CheckpointError(f"{src.origin}: the copies of prefix tensor {suffix} differ: the file is corrupt")
        found[suffix] = t
    _need(bool(found), src, "prefix tuning config without prefix tensors")
    return found


# ---------------------------------------------------------------- LoRA
def _lora(c: dict, src: _Source, old: bool) -> list:
    c = _fields(c, LORA, LORA_IGNORED, "lora", src)
    _need(c["composition_mode"] == "add", src, f"composition_mode={c['composition_mode']!r} ((IA)^3)")
    _need(not c["use_dora"], src, "DoRA (use_dora=True)")
    _need(c["vera_d"] is None and c["vera_b"] is None, src, "VeRA (vera_d / vera_b)")
    _need(c["dtype"] in (None, "float32"), src, f"LoRA dtype {c['dtype']!r}")
    bad = [m for m in c["attn_matrices"] if m not in ("q", "k", "v")]
    _need(not bad, src, f"attn_matrices {bad}")
    targets = [m for m in ("q", "k", "v") if c["selfattn_lora"] and m in c["attn_matrices"]]
    targets += ["ffn_in"] * bool(c["intermediate_lora"]) + ["ffn_out"] * bool(c["output_lora"])
    r, alpha, gate = int(c["r"]), float(c["r"] if old else c["alpha"]), bool(c["use_gating"])
    dims = {"q": (src.d, src.d), "k": (src.d, src.d), "v": (src.d, src.d), "ffn_in": (src.d, src.f),
            "ffn_out": (src.f, src.d)}
    layers = _layers(c["leave_out"], src)
    for i in layers:
        for t in targets:
            p, q = f"{src.at(i, t)}loras.{src.name}.", f"layers.{i}.lora.{t}."
            d_in, d_out = dims[t]
            src.out[q + "lora_A"] = src.take(p + "lora_A", (r, d_in))
            src.out[q + "lora_B"] = src.take(p + "lora_B", (d_out, r))
            if gate:
                src.out[q + "gate.gate_weight"] = src.take(p + "gate.weight", (1, d_in))
                src.out[q + "gate.gate_bias"] = src.take(p + "gate.bias", (1,))
    return [LoRAConfig(r=r, alpha=alpha, targets=tuple(targets), gate=gate, layers=layers)] if targets else []


# ---------------------------------------------------------------- heads
def _not_a_classifier(hc: dict) -> str | None:
    """What the saved head is when it is not a (sequence) classifier, else None."""
    cfg = hc.get("config")
    if cfg is None:  # a static Hugging Face head: its model class says what it is
        mc = str(hc.get("model_class", ""))
        return None if mc.endswith("ForSequenceClassification") else f"head of model class {mc!r}"
    if not isinstance(cfg, dict):
        raise CheckpointError(f"head_config.json: 'config' is {type(cfg).__name__}, not an object: the file is corrupt")
    kind = cfg.get("head_type", "classification")  # without a type: checked (and refused) as a classifier
    return None if kind in CLASSIFIER_HEADS else f"{kind!r} head {hc.get('name')!r}"


def _head(folder: Path, src: _Source, model_type: str, backbone: Backbone, notes: list) -> tuple:
    """(HeadConfig, labels, head tensors) of a classifier; (None, (), {}) when the adapter was saved without a
    head or with one that is not a classifier (ignored, with a note): an embedding adapter."""
    f = folder / "head_config.json"
    if not f.is_file():
        return None, (), {}
    hc = read_json(f)
    other = _not_a_classifier(hc)
    if other is not None:
        notes.append(f"{f}: the {other} is not a classifier: it is ignored, and the adapter is imported as an "
                     "embedding adapter (the pooled last hidden state)")
        return None, (), {}
    tensors, _ = read_weights(folder, "model_head.safetensors", "pytorch_model_head.bin")
    check_float(tensors, str(folder))
    cfg, origin = hc.get("config"), str(folder / "head_config.json")
    if cfg is None:  # a static Hugging Face head (XForSequenceClassification after adapters.init)
        head, t = static_head(tensors, "", model_type, backbone, hc.get("num_labels"), origin)
        labels = labels_of(hc.get("label2id"), None, head.num_labels)
    else:
        want = {"head_type": "classification", "layers": 2, "activation_function": "tanh", "use_pooler": False,
                "bias": True}
        bad = {k: cfg.get(k) for k, v in want.items() if cfg.get(k, v) != v}
        if bad:
            raise src.refuse(f"classification head options {bad} (imported: {want})")
        n, d, p = int(cfg["num_labels"]), src.d, f"heads.{hc.get('name')}."
        t = {"head.dense.weight": take(tensors, p + "1.weight", (d, d), origin),
             "head.dense.bias": take(tensors, p + "1.bias", (d,), origin),
             "head.out_proj.weight": take(tensors, p + "4.weight", (n, d), origin),
             "head.out_proj.bias": take(tensors, p + "4.bias", (n,), origin)}
        head, labels = HeadConfig(n, "cls"), labels_of(cfg.get("label2id"), None, n)
    if tensors:
        raise src.refuse(f"unexpected head tensors {sorted(tensors)[:4]}")
    return head, labels, t


# ---------------------------------------------------------------- the whole checkpoint
def _family(comps: list) -> str:
    kinds = {type(c).__name__ for c in comps}
    bns = [c for c in comps if isinstance(c, BottleneckConfig)]
    if kinds == {"PrefixConfig", "BottleneckConfig"} and all(b.mode == "parallel" for b in bns):
        return "mam"
    if kinds == {"PrefixConfig", "BottleneckConfig", "LoRAConfig"} and all(c.gate for c in comps):
        return "unipelt"
    if kinds == {"BottleneckConfig"} and all(b.phm_n for b in bns):
        return "compacter" if {b.site for b in bns} == {"attn", "ffn"} else "compacter_pp"
    if kinds == {"BottleneckConfig"}:
        return "parallel_adapter" if all(b.mode == "parallel" for b in bns) else "adapter"
    if len(kinds) == 1:
        return {"PrefixConfig": "prefix", "LoRAConfig": "lora"}[kinds.pop()]
    return "union"


def _components(config: dict, src: _Source, meta: dict, old: bool) -> list:
    """The method components of a config (a union's sub-configs in order), their tensors moved to src.out."""
    subs = config.get("configs") if config.get("architecture") == "union" else [config]
    comps = []
    for c in subs or []:
        arch = c.get("architecture") if isinstance(c, dict) else "?"
        if arch in (None, "bottleneck"):
            comps += _bottleneck(c, src, meta)
        elif arch == "prefix_tuning":
            comps += _prefix(c, src)
        elif arch == "lora":
            comps += _lora(c, src, old)
        else:
            raise src.refuse(f"adapter architecture {arch!r} (supported: bottleneck, prefix_tuning, lora, union)")
    return comps


def import_adapterhub(folder: Path, backbone: Backbone) -> Imported:
    folder = Path(folder)
    meta = read_json(folder / "adapter_config.json")
    config, name, version = meta.get("config"), meta.get("name"), meta.get("version")
    if not isinstance(config, dict) or not isinstance(name, str):
        raise CheckpointError(f"{folder}/adapter_config.json is not an AdapterHub adapter config (needs a 'config' "
                              "object and a 'name')")
    ec = backbone.config
    mt = meta.get("model_type")
    if mt not in BASE:
        raise CheckpointError(f"{folder}: model_type {mt!r} is not supported; supported: {', '.join(BASE)}")
    if mt != ec.model_type or meta.get("hidden_size", ec.hidden_size) != ec.hidden_size:
        raise CheckpointError(f"{folder}: the adapter is for a {mt} model of hidden size {meta.get('hidden_size')}, "
                              f"the backbone {backbone.name} is a {ec.model_type} of hidden size {ec.hidden_size}")
    if version is None and config.get("non_linearity") in LEGACY_ACTS:  # adapter-transformers' activation names
        config = {**config, "non_linearity": LEGACY_ACTS[config["non_linearity"]]}
    old = isinstance(version, str) and version.startswith("adapters.") and _version(version[9:]) < (1, 1, 0)
    raw, wfile = read_weights(folder, "adapter.safetensors", "pytorch_adapter.bin")
    check_float(raw, str(folder / wfile))
    base = BASE[mt] + "."
    tensors = {}
    for k, v in raw.items():
        for a, b in LEGACY_KEYS.items():
            k = k.replace(a, b)
        tensors[k.removeprefix(base)] = v
    src = _Source(tensors, name, folder, ec.num_hidden_layers, ec.hidden_size, ec.intermediate_size, mt)
    comps = _components(config, src, meta, old)
    if not comps:
        raise src.refuse("the config adds no adapter to any layer")
    if src.t:
        raise src.refuse(f"tensors {sorted(src.t)[:4]} belong to no supported part of the config "
                         f"(layers beyond the backbone's {src.L}, invertible adapters, fusion, embeddings?)")
    notes: list[str] = []
    head, labels, head_t = _head(folder, src, mt, backbone, notes)
    method = MethodConfig(_family(comps), tuple(comps), gate_pooling="all")
    source = {"library": "adapterhub", "version": version or "adapter-transformers (no version)", "name": name,
              "model_name": meta.get("model_name"), "weights": wfile}
    return Imported(method, head, labels, {f"adapters.{k}": v for k, v in src.out.items()} | head_t, source, notes)
