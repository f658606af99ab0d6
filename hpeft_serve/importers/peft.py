"""Import Hugging Face `peft` checkpoints exactly: LoRA, (IA)^3 and prefix tuning of a sequence classifier or
of a feature extractor (an embedding adapter).

A checkpoint folder is what `PeftModel.save_pretrained(dir)` writes: `adapter_config.json` and
`adapter_model.safetensors` (or `adapter_model.bin`, read without unpickling code), with the classifier
saved through `modules_to_save` (task_type SEQ_CLS), or without one (task_type FEATURE_EXTRACTION: the
model was the bare encoder, imported as an embedding adapter; a LoRA on BERT's pooler, which the pooled last
hidden state never uses, is ignored with a note).

- LoRA on any projection of the encoder layers (query, key, value, attention output, intermediate, output;
  from the saved tensors, so `target_modules`, `layers_to_transform` and `exclude_modules` need no
  re-matching), scaled by lora_alpha / r or, with `use_rslora`, lora_alpha / sqrt(r); `rank_pattern` and
  `alpha_pattern` resolved per module as peft resolves them.
- (IA)^3 (`ia3_l` per module, from the saved tensors as for LoRA): a vector (out, 1) scales the module's output
  (bias included), one (1, in) its input (peft's `feedforward_modules`). hpeft scales q k v ffn_in on their
  output and o ffn_out on their input (BERT's default peft config: key and value, and `output.dense`, which
  ends both the attention output's and the FFN output's name, as feedforward); another orientation is
  refused, naming the module.
- Prefix tuning: `prompt_embeddings` (P, 2 L d) are the key/values (the MLP, if any, was evaluated at save).
  peft passes them as past key/values, so transformers shifts the token positions by P: imported as a prefix
  with shift_positions. peft runs this for BERT-type classifiers only (on RoBERTa / XLM-R its sequence-
  classification forward feeds the cache to the classifier and fails), so those are refused; feature
  extractors (embedding adapters) run on all three.
Any config option that changes the forward and is not modelled (DoRA, LoRA biases, fan_in_fan_out, ...) is
refused, naming it.

Families (FAMILY_PATHS): BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, DeBERTa-v2/v3. On DistilBERT, ELECTRA and
DeBERTa-v2 a LoRA of the bare encoder (FEATURE_EXTRACTION) imports; their SEQ_CLS classifiers are not
dense + tanh and are refused by name (common.OTHER_HEADS), as is prefix tuning (past key/values, which
DistilBERT's and DeBERTa-v2's attention do not take). Per-family quirks: importers/adapterhub.py, QUIRKS.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..backbone import Backbone
from ..errors import CheckpointError
from ..methods.config import IA3_INPUT, IA3_TARGETS, IA3Config, LoRAConfig, MethodConfig, PrefixConfig
from .common import (
    Imported,
    check_float,
    labels_of,
    read_json,
    read_weights,
    static_head,
    take,
)

# per family: the module paths of its projections inside a layer -> our names, and its layer list
BERT_PATHS = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
              "attention.output.dense": "o", "intermediate.dense": "ffn_in", "output.dense": "ffn_out"}
FAMILY_PATHS = {"bert": BERT_PATHS, "roberta": BERT_PATHS, "xlm-roberta": BERT_PATHS, "electra": BERT_PATHS,
                "distilbert": {"attention.q_lin": "q", "attention.k_lin": "k", "attention.v_lin": "v",
                               "attention.out_lin": "o", "ffn.lin1": "ffn_in", "ffn.lin2": "ffn_out"},
                "deberta-v2": {"attention.self.query_proj": "q", "attention.self.key_proj": "k",
                               "attention.self.value_proj": "v", "attention.output.dense": "o",
                               "intermediate.dense": "ffn_in", "output.dense": "ffn_out"}}
BASE = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "electra": "electra",
        "distilbert": "distilbert", "deberta-v2": "deberta"}  # the base model's attribute in a classifier
LORA_KEY = re.compile(r"^base_model\.model\.((?:bert|roberta|electra|distilbert|deberta)\.)?"
                      r"(encoder|transformer)\.layer\.(\d+)\.(.+)\.lora_([AB])\.weight$")
IA3_KEY = re.compile(r"^base_model\.model\.((?:bert|roberta|electra|distilbert|deberta)\.)?"
                     r"(encoder|transformer)\.layer\.(\d+)\.(.+)\.ia3_l$")
# options read below, and options with no effect at inference; any other option must be unset (null/false/empty)
HANDLED = {"peft_type", "task_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
           "target_modules", "modules_to_save", "layers_to_transform", "layers_pattern", "exclude_modules",
           "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules",
           "prefix_projection", "encoder_hidden_size", "feedforward_modules"}
HARMLESS = {"base_model_name_or_path", "revision", "inference_mode", "init_lora_weights", "lora_dropout",
            "megatron_core", "qalora_group_size", "peft_version", "auto_mapping", "loftq_config",
            "ensure_weight_tying", "init_weights", "bias", "init_ia3_weights"}


IMPORTABLE = tuple(FAMILY_PATHS)  # the families whose peft key names are mapped above
TASKS = ("SEQ_CLS", "FEATURE_EXTRACTION")
POOLER_LORA = re.compile(r"^base_model\.model\.(bert\.)?pooler\.dense\.lora_[AB]\.weight$")


def _refuse(folder: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{folder}: {what}; it is not imported (an approximate import would change the outputs)")


def _check_options(cfg: dict, folder: Path) -> None:
    if cfg.get("bias", "none") != "none":
        raise _refuse(folder, f"bias={cfg['bias']!r} (trained biases of the backbone)")
    set_ = sorted(k for k, v in cfg.items() if k not in HANDLED | HARMLESS and v not in (None, False, {}, [], ""))
    if set_:
        raise _refuse(folder, f"peft option(s) {set_} are set and not modelled")
    if cfg.get("task_type") not in TASKS:
        raise CheckpointError(f"{folder}: task_type {cfg.get('task_type')!r}: hpeft imports sequence classifiers "
                              "(task_type SEQ_CLS, whose classifier peft saves with the adapter) and embedding "
                              "adapters (task_type FEATURE_EXTRACTION)")


def _pattern(patterns: dict, key: str, default):
    """peft's get_pattern_key: the first pattern that matches the end of the module name."""
    for p in patterns or {}:
        if re.match(rf"(.*\.)?({p})$", key):
            return patterns[p]
    return default


def _check_family(cfg: dict, backbone: Backbone, folder: Path) -> None:
    """A feature extractor's keys do not name the model family (no `bert.` / `roberta.`): when the recorded
    base model is a local Hugging Face folder, its model type must be the backbone's."""
    base = cfg.get("base_model_name_or_path")
    f = Path(base) / "config.json" if isinstance(base, str) and base else None
    if f is None or not f.is_file():
        return
    try:
        mt = json.loads(f.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return
    if mt and mt != backbone.config.model_type:
        raise CheckpointError(f"{folder}: the adapter was trained on {base}, a {mt} model; the backbone "
                              f"{backbone.name} is a {backbone.config.model_type}: use the backbone it was trained on")


def _ignore_pooler(tensors: dict, notes: list, folder: Path) -> None:
    """A feature extractor's LoRA on BERT's pooler: the embedding (pooled last hidden state) never uses it."""
    keys = sorted(k for k in tensors if POOLER_LORA.match(k))
    for k in keys:
        del tensors[k]
    if keys:
        notes.append(f"{folder}: the LoRA on the pooler (pooler.dense) is ignored: an embedding pools the last "
                     "hidden state, which the pooler does not change")


def _layers_path(backbone: Backbone) -> str:
    return "transformer.layer" if backbone.config.model_type == "distilbert" else "encoder.layer"


def _dims(backbone: Backbone) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection."""
    d, f = backbone.config.hidden_size, backbone.config.intermediate_size
    return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "ffn_in": (d, f), "ffn_out": (f, d)}


def _match(key_re: re.Pattern, k: str, what: str, backbone: Backbone, folder: Path) -> re.Match:
    """`k` matched by `key_re` (groups: model prefix, layers path, layer, module path, ...) on one of the
    backbone's projections, else a clear error naming the tensor."""
    ec = backbone.config
    base, paths = BASE[ec.model_type], FAMILY_PATHS[ec.model_type]
    m = key_re.match(k)
    if m and m.group(1) and m.group(1) != base + ".":
        raise CheckpointError(f"{folder}: the {what} tensors are for a {m.group(1)[:-1]} model, the backbone "
                              f"{backbone.name} is a {ec.model_type}: use the backbone it was trained on")
    if not m or f"{m.group(2)}.layer" != _layers_path(backbone) or m.group(4) not in paths \
            or int(m.group(3)) >= ec.num_hidden_layers:
        raise _refuse(folder, f"{what} tensor {k} is not on a projection of the backbone's "
                      f"{ec.num_hidden_layers} encoder layers")
    return m


def _lora(cfg: dict, tensors: dict, backbone: Backbone, folder: Path) -> tuple[list, dict]:
    base, paths = BASE[backbone.config.model_type], FAMILY_PATHS[backbone.config.model_type]
    layers = _layers_path(backbone)
    found: dict[tuple[int, str], dict] = {}
    for k in [k for k in tensors if ".lora_" in k]:
        m = _match(LORA_KEY, k, "LoRA", backbone, folder)
        found.setdefault((int(m.group(3)), m.group(4)), {})[m.group(5)] = tensors.pop(k)
    if not found:
        raise _refuse(folder, "a LoRA config without LoRA tensors")
    groups: dict[tuple, list[int]] = {}
    out = {}
    dims = _dims(backbone)
    for (i, path), ab in sorted(found.items()):
        t, module = paths[path], f"{base}.{layers}.{i}.{path}"
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{folder}: {module} has lora_A or lora_B but not both")
        r = ab["A"].shape[0]
        if r != _pattern(cfg.get("rank_pattern"), module, cfg.get("r")):
            raise CheckpointError(f"{folder}: {module} has rank {r}, its config says "
                                  f"{_pattern(cfg.get('rank_pattern'), module, cfg.get('r'))}")
        alpha = float(_pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha")))
        d_in, d_out = dims[t]
        out[f"adapters.layers.{i}.lora.{t}.lora_A"] = take({"A": ab["A"]}, "A", (r, d_in), f"{folder}: {module}")
        out[f"adapters.layers.{i}.lora.{t}.lora_B"] = take({"B": ab["B"]}, "B", (d_out, r), f"{folder}: {module}")
        groups.setdefault((t, r, alpha), []).append(i)
    rs = bool(cfg.get("use_rslora"))
    comps = [LoRAConfig(r=r, alpha=alpha, targets=(t,), layers=tuple(layers), rslora=rs)
             for (t, r, alpha), layers in groups.items()]
    return comps, out


def _ia3(tensors: dict, backbone: Backbone, folder: Path) -> tuple[list, dict]:
    """peft's `ia3_l` tensors as (IA)^3 components (one per set of targets, on the layers that have it)."""
    paths, layers, dims = FAMILY_PATHS[backbone.config.model_type], _layers_path(backbone), _dims(backbone)
    found: dict[int, dict[str, object]] = {}
    out = {}
    for k in sorted(k for k in tensors if k.endswith(".ia3_l")):
        m = _match(IA3_KEY, k, "(IA)^3", backbone, folder)
        i, t = int(m.group(3)), paths[m.group(4)]
        module, (d_in, d_out) = f"{layers}.{i}.{m.group(4)}", dims[t]
        on_input = t in IA3_INPUT
        want, other = ((1, d_in), (d_out, 1)) if on_input else ((d_out, 1), (1, d_in))
        if tuple(tensors[k].shape) == other and want != other:
            raise _refuse(folder, f"(IA)^3 on {module} scales its {'output' if on_input else 'input'} (peft "
                          f"feedforward_modules {'does not name' if on_input else 'names'} it); hpeft scales "
                          f"{t} on its {'input' if on_input else 'output'} ({', '.join(IA3_INPUT)} on the input)")
        out[f"adapters.layers.{i}.ia3.{t}"] = take(tensors, k, want, f"{folder}: {module}").reshape(-1)
        found.setdefault(i, {})[t] = True
    if not found:
        raise _refuse(folder, "an IA3 config without ia3_l tensors")
    groups: dict[tuple, list[int]] = {}
    for i, ts in sorted(found.items()):
        groups.setdefault(tuple(t for t in IA3_TARGETS if t in ts), []).append(i)
    return [IA3Config(targets=ts, layers=tuple(ls)) for ts, ls in groups.items()], out


def _prefix(cfg: dict, tensors: dict, backbone: Backbone, folder: Path, embedding: bool) -> tuple[list, dict]:
    ec = backbone.config
    if ec.model_type not in ("bert", "roberta", "xlm-roberta"):
        raise _refuse(folder, f"peft prefix tuning of a {ec.model_type} model (peft passes the prefix as past "
                      "key/values, which DistilBERT's and DeBERTa-v2's attention do not take, and which is not "
                      "checked against peft for ELECTRA)")
    if ec.model_type != "bert" and not embedding:
        raise _refuse(folder, f"peft prefix tuning of a {ec.model_type} sequence classifier (peft runs it for BERT "
                      "only: on RoBERTa / XLM-R its forward fails, so there is no reference to match)")
    want = {"num_layers": ec.num_hidden_layers, "token_dim": ec.hidden_size,
            "num_attention_heads": ec.num_attention_heads, "num_transformer_submodules": 1}
    bad = {k: cfg.get(k) for k, v in want.items() if cfg.get(k, v) != v}
    if bad:
        raise CheckpointError(f"{folder}: prefix config {bad} does not fit backbone {backbone.name} {want}")
    P, L, d = int(cfg["num_virtual_tokens"]), ec.num_hidden_layers, ec.hidden_size
    if P >= ec.max_position_embeddings:
        raise _refuse(folder, f"a prefix of {P} leaves no positions of {ec.max_position_embeddings}")
    kv = take(tensors, "prompt_embeddings", (P, L * 2 * d), str(folder))
    out = {"adapters.prefix.prefix_kv": kv.reshape(P, L, 2, d).permute(1, 2, 0, 3).contiguous()}  # (L, 2, P, d)
    return [PrefixConfig(length=P, bottleneck=0, shift_positions=True)], out


def import_peft(folder: Path, backbone: Backbone) -> Imported:
    folder = Path(folder)
    cfg = read_json(folder / "adapter_config.json")
    kind = cfg.get("peft_type")
    if kind not in ("LORA", "IA3", "PREFIX_TUNING"):
        raise CheckpointError(f"{folder}: peft_type {kind!r} is not supported (supported: LORA, IA3, PREFIX_TUNING)")
    _check_options(cfg, folder)
    if backbone.config.model_type not in IMPORTABLE:
        raise CheckpointError(f"{folder}: importing peft adapters of a {backbone.config.model_type} backbone is not "
                              f"supported yet (supported: {', '.join(IMPORTABLE)}); train it here with hpeft train")
    tensors, wfile = read_weights(folder, "adapter_model.safetensors", "adapter_model.bin")
    check_float(tensors, str(folder / wfile))
    notes: list[str] = []
    embedding = cfg["task_type"] == "FEATURE_EXTRACTION"
    if embedding:
        _check_family(cfg, backbone, folder)
        _ignore_pooler(tensors, notes, folder)
    if kind == "LORA":
        comps, out = _lora(cfg, tensors, backbone, folder)
        head_prefix = "base_model.model."
    elif kind == "IA3":
        comps, out = _ia3(tensors, backbone, folder)
        head_prefix = "base_model.model."
    else:
        comps, out = _prefix(cfg, tensors, backbone, folder, embedding)
        head_prefix = "base_model."
    head, head_t, labels = None, {}, ()
    if not embedding:
        if not any(k.startswith(head_prefix + "classifier.") for k in tensors):
            raise CheckpointError(f"{folder} holds no classifier (modules_to_save): a SEQ_CLS adapter needs it "
                                  "(an adapter of the bare encoder is task_type FEATURE_EXTRACTION)")
        head, head_t = static_head(tensors, head_prefix, backbone.config.model_type, backbone, None,
                                   str(folder / wfile))
        labels = labels_of(None, None, head.num_labels)
    if tensors:
        raise _refuse(folder, f"tensors {sorted(tensors)[:4]} belong to no supported part (other modules_to_save, "
                      "trainable tokens?)")
    method = MethodConfig({"LORA": "lora", "IA3": "ia3"}.get(kind, "prefix"), tuple(comps))
    source = {"library": "peft", "version": cfg.get("peft_version"), "peft_type": kind,
              "task_type": cfg["task_type"], "base_model": cfg.get("base_model_name_or_path"), "weights": wfile}
    return Imported(method, head, labels, out | head_t, source, notes)
