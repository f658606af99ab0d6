"""What both importers share: reading the source files, the classification heads (or, without one, the
embedding head), and writing the result as a normal hpeft checkpoint (built, loaded strictly into the model,
saved with `checkpoint.save`).

An importer turns a foreign checkpoint into an `Imported`: a MethodConfig and HeadConfig that express the
source library's forward exactly, plus the tensors under our names (`adapters.*`, `head.*`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backbone import Backbone
from ..errors import CheckpointError
from ..methods.config import MethodConfig
from ..model import HeadConfig, HybridModel
from .torch_bin import load_state_dict


@dataclass
class Imported:
    method: MethodConfig
    head: HeadConfig | None  # None: no classifier in the source, an embedding adapter (see embedding_head)
    labels: tuple[str, ...]
    tensors: dict[str, torch.Tensor]
    source: dict = field(default_factory=dict)  # what the checkpoint records about where it came from
    notes: list[str] = field(default_factory=list)  # what the import ignored or chose, told to the user


def embedding_head(imp: Imported, backbone: Backbone, pooling: str | None, normalize: bool | None,
                   origin: str) -> Imported:
    """An import without classifier becomes an embedding adapter: pooling and normalisation as given, else
    the backbone's (its sentence-transformers config); a classifier keeps its head, and refuses them."""
    if imp.head is not None:
        if pooling is not None or normalize is not None:
            raise CheckpointError(f"{origin} holds a classification head ({imp.head.num_labels} labels): it is "
                                  "imported as a classifier; --pooling and --normalize apply to adapters saved "
                                  "without a classifier (embedding adapters)")
        return imp
    dp, dn = backbone.embedding_defaults()
    head = HeadConfig(0, pooling or dp, task="embedding", normalize=dn if normalize is None else bool(normalize))
    norm = "L2-normalised" if head.normalize else "not normalised"
    said = "as asked" if pooling is not None or normalize is not None else "the backbone's defaults"
    notes = [*imp.notes, f"imported as an embedding adapter: {head.pooling} pooling, {norm} ({said})"]
    return Imported(imp.method, head, (), imp.tensors, imp.source, notes)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def read_weights(folder: Path, safetensors_name: str, bin_name: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of `safetensors_name` (preferred) or `bin_name` (read without unpickling code)."""
    st, binf = folder / safetensors_name, folder / bin_name if bin_name else None
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(st)), st.name
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{st} is not a readable safetensors file ({e}): the file is truncated or "
                                  "corrupt") from None
    if binf is not None and binf.is_file():
        return load_state_dict(binf), binf.name
    names = " or ".join(n for n in (safetensors_name, bin_name) if n)
    raise CheckpointError(f"{folder} has no weights file ({names})")


def check_float(tensors: dict[str, torch.Tensor], origin: str) -> None:
    for k, v in tensors.items():
        if v.dtype != torch.float32:
            raise CheckpointError(f"{origin}: tensor {k} is {v.dtype}; only float32 checkpoints are imported "
                                  "(an exact import cannot change precision)")
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{origin}: tensor {k} holds NaN or infinite values")


def take(tensors: dict[str, torch.Tensor], key: str, shape: tuple, origin: str) -> torch.Tensor:
    """Pop tensor `key`, checking its shape (a wrong one means the adapter was made for another backbone)."""
    if key not in tensors:
        raise CheckpointError(f"{origin}: tensor {key} is missing")
    t = tensors.pop(key)
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{origin}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(shape)} for this "
                              "backbone: the adapter was trained on a different backbone")
    return t


def labels_of(label2id: dict | None, id2label: dict | None, num_labels: int) -> tuple[str, ...]:
    if label2id:
        by_id = {int(v): str(k) for k, v in label2id.items()}
    elif id2label:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    else:
        by_id = {}
    return tuple(by_id.get(i, str(i)) for i in range(num_labels))


# ---------------------------------------------------------------- heads
def pooler(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's pooler (dense + tanh on the first token), which its sequence-classification head runs on."""
    if backbone.folder is None:
        raise CheckpointError(f"backbone {backbone.name} has no pooler weights; a BERT sequence-classification head "
                              "needs them: use the Hugging Face folder the adapter was trained on")
    from safetensors import safe_open
    with safe_open(str(backbone.folder / "model.safetensors"), "pt") as f:
        keys = {k.split("pooler.", 1)[-1]: k for k in f.keys() if "pooler.dense." in k}  # noqa: SIM118
        if {"dense.weight", "dense.bias"} - set(keys):
            raise CheckpointError(f"backbone {backbone.folder} has no pooler weights (pooler.dense), which a BERT "
                                  "sequence-classification head runs on: save the backbone with its pooler")
        return f.get_tensor(keys["dense.weight"]).float(), f.get_tensor(keys["dense.bias"]).float()


# the *ForSequenceClassification heads that are not dense + tanh + linear on the first token: refused by name
OTHER_HEADS = {"distilbert": "DistilBertForSequenceClassification's head (pre_classifier + ReLU + classifier)",
               "electra": "ElectraForSequenceClassification's head (dense + GELU + out_proj)",
               "deberta-v2": "DebertaV2ForSequenceClassification's head (ContextPooler: dense + pooler_hidden_act, "
                             "GELU by default, + classifier)"}


def static_head(tensors: dict, prefix: str, model_type: str, backbone: Backbone, num_labels: int | None,
                origin: str) -> tuple[HeadConfig, dict[str, torch.Tensor]]:
    """Hugging Face *ForSequenceClassification heads: RoBERTa/XLM-R `classifier.dense/out_proj` on the first
    token; BERT `classifier` on the backbone's pooler (dense + tanh on the first token). Both are our head
    with cls pooling. The other families' heads use another activation (OTHER_HEADS): refused."""
    d = backbone.config.hidden_size
    if model_type in OTHER_HEADS:
        raise CheckpointError(f"{origin}: {OTHER_HEADS[model_type]} is not modelled (the classification head here "
                              "is dense + tanh + linear); it is not imported (an approximate import would change "
                              "the outputs). Import the adapter saved without this head (an embedding adapter: "
                              "peft task_type FEATURE_EXTRACTION, AdapterHub save_adapter(with_head=False)), or "
                              "with an AdapterHub flex classification head")
    if model_type == "bert":
        w = tensors.get(f"{prefix}classifier.weight")
        n = num_labels or (w.shape[0] if w is not None else 0)
        dense_w, dense_b = pooler(backbone)
        out_w = take(tensors, f"{prefix}classifier.weight", (n, d), origin)
        out_b = take(tensors, f"{prefix}classifier.bias", (n,), origin)
    else:
        w = tensors.get(f"{prefix}classifier.out_proj.weight")
        n = num_labels or (w.shape[0] if w is not None else 0)
        dense_w = take(tensors, f"{prefix}classifier.dense.weight", (d, d), origin)
        dense_b = take(tensors, f"{prefix}classifier.dense.bias", (d,), origin)
        out_w = take(tensors, f"{prefix}classifier.out_proj.weight", (n, d), origin)
        out_b = take(tensors, f"{prefix}classifier.out_proj.bias", (n,), origin)
    return HeadConfig(n, "cls"), {"head.dense.weight": dense_w, "head.dense.bias": dense_b,
                                  "head.out_proj.weight": out_w, "head.out_proj.bias": out_b}


# ---------------------------------------------------------------- build and save
def build(imp: Imported, backbone: Backbone) -> HybridModel:
    """The model of an import, its tensors loaded strictly (every tensor used, every shape right)."""
    model = HybridModel(backbone.build_encoder(), imp.method, imp.head)
    model.adapters.eject_prefix()
    want = {f"adapters.{k}": v for k, v in model.adapters.state_dict().items()}
    want |= {f"head.{k}": v for k, v in model.head.state_dict().items()}
    missing, extra = sorted(set(want) - set(imp.tensors)), sorted(set(imp.tensors) - set(want))
    if missing or extra:  # a bug of the importer, not of the user's file
        raise RuntimeError(f"import does not fill the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in want.items():
        if tuple(imp.tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"imported tensor {k} has shape {tuple(imp.tensors[k].shape)}, the model expects "
                                  f"{tuple(v.shape)}: the adapter was trained on a different backbone")
    strip = lambda p: {k[len(p):]: v.to(want[k].dtype).contiguous() for k, v in imp.tensors.items()
                       if k.startswith(p)}
    model.adapters.load_state_dict(strip("adapters."), strict=True)
    model.head.load_state_dict(strip("head."), strict=True)
    return model.eval()


def save(imp: Imported, backbone: Backbone, out: Path, name: str | None) -> Path:
    from .. import checkpoint
    model = build(imp, backbone)
    return checkpoint.save(model, backbone, out, imp.labels, {"imported_from": imp.source}, name=name)
