"""Checkpoint folders: `adapter_config.json` (method, backbone name and sha256, slot dims, labels, head) and
`adapter.safetensors` (adapter tensors under `adapters.`, head tensors under `head.`).

An embedding adapter's head is {"task": "embedding", "num_labels": 0, "pooling", "normalize"}: its labels
are [] and it has no head tensors. A head without "task" (checkpoints from before embeddings) is a classifier.

Saving ejects prefixes first (the checkpoint holds the vectors, not the training MLP). Loading is strict:
a missing, extra or mis-shaped tensor, a non-finite value, or a backbone whose sha256 differs from the
recorded one is a CheckpointError naming it. Only JSON and safetensors are read; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from . import __version__
from .backbone import Backbone, load_backbone
from .errors import CheckpointError, HpeftError
from .names import check_name
from .methods.config import MethodConfig
from .model import HeadConfig, HybridModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "hpeft-adapter"


def slot_dims(model: HybridModel) -> list[dict]:
    """Per layer, the width of every slot the adapter fills (what a shared-backbone layout must hold)."""
    out = []
    ad = model.adapters
    for i, la in enumerate(ad.layers):
        d: dict = {}
        if la.lora:
            d["lora"] = {t: m.lora_A.shape[0] for t, m in la.lora.items()}
        if la.has_prefix:
            d["prefix"] = ad.prefix.length
        for kind, slots in (("seq", la.seq), ("par", la.par)):
            for site, b in slots.items():
                d[f"{kind}_{site}"] = {"width": b.cfg.width(model.encoder.config.hidden_size), "phm_n": b.cfg.phm_n}
        if la.bitfit is not None:
            d["bitfit"] = True
        if la.ia3 is not None:
            d["ia3"] = sorted(la.ia3)
        out.append(d)
    return out


def state_tensors(model: HybridModel) -> dict[str, torch.Tensor]:
    t = {f"adapters.{k}": v.detach().contiguous() for k, v in model.adapters.state_dict().items()}
    t.update({f"head.{k}": v.detach().contiguous() for k, v in model.head.state_dict().items()})
    return t


def save(model: HybridModel, backbone: Backbone, out: Path, labels: tuple[str, ...], meta: dict,
         name: str | None = None) -> Path:
    """Write a checkpoint folder atomically (files are written to a temp name, then renamed); the adapter's
    name is the folder's name unless `name` is given."""
    from safetensors.torch import save_file
    out = Path(out)
    name = check_name(name or out.name)
    out.mkdir(parents=True, exist_ok=True)
    model.adapters.eject_prefix()
    config = {"format": FORMAT, "format_version": 1, "hpeft_version": __version__, "name": name,
              "method": model.adapters.method_config.method, "method_config": model.adapters.method_config.to_dict(),
              "backbone": backbone.describe(), "head": model.head.cfg.to_dict(), "labels": list(labels),
              "slots": slot_dims(model), **meta}
    _atomic_write(out / WEIGHTS_FILE, lambda p: save_file(state_tensors(model), p, metadata={"format": FORMAT}))
    _atomic_write(out / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def _atomic_write(dest: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_config(folder: Path) -> dict:
    folder = Path(folder)
    f = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not f.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint: it has no {CONFIG_FILE}")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{f} is not an hpeft checkpoint config (format is not {FORMAT!r}); "
                              "import other libraries' checkpoints with `hpeft import`")
    for k in ("name", "method_config", "backbone", "head", "labels"):
        if k not in cfg:
            raise CheckpointError(f"{f} lacks the field {k!r}")
    check_name(cfg["name"])
    return cfg


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    f = Path(folder) / WEIGHTS_FILE
    if not f.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f} is not a readable safetensors file ({e}); the file is truncated or corrupt: "
                              "copy it again or re-train") from None


def load(folder: Path, backbone: Backbone | None = None) -> tuple[HybridModel, dict]:
    """Rebuild the model of a checkpoint (eval mode) and its config; strict in every respect."""
    cfg = read_config(folder)
    tensors = read_tensors(folder)
    want = cfg["backbone"]
    try:
        backbone = backbone or load_backbone(want["name"])
    except HpeftError as e:
        raise CheckpointError(f"checkpoint {folder} needs backbone {want.get('name')!r}: {e}") from None
    if backbone.sha256 != want.get("sha256"):
        raise CheckpointError(f"checkpoint {folder} was trained on backbone {want.get('name')!r} "
                              f"(sha256 {str(want.get('sha256'))[:12]}...), not on {backbone.name!r} "
                              f"(sha256 {backbone.sha256[:12]}...)")
    try:
        method = MethodConfig.from_dict(cfg["method_config"])
        head = HeadConfig(**cfg["head"])
    except (HpeftError, TypeError) as e:
        raise CheckpointError(f"{folder}/{CONFIG_FILE}: invalid method or head config: {e}") from None
    _check_labels(cfg["labels"], head, folder)
    model = HybridModel(backbone.build_encoder(), method, head)
    model.adapters.eject_prefix()
    _load_strict(model, tensors, folder)
    return model.eval(), cfg


def _check_labels(labels, head: HeadConfig, folder: Path) -> None:
    """A classifier names each of its labels; an embedding adapter has none."""
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise CheckpointError(f"{folder}/{CONFIG_FILE}: labels must be a list of strings, got {labels!r:.80}")
    if len(labels) != head.num_labels:
        what = "an embedding adapter has no labels ([])" if head.embedding else f"its head has {head.num_labels}"
        raise CheckpointError(f"{folder}/{CONFIG_FILE}: {len(labels)} labels, but {what}")


def _load_strict(model: HybridModel, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    expected = state_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{folder}/{WEIGHTS_FILE} does not match its config: "
                              f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                              f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k, v in expected.items():
        t = tensors[k]
        if t.shape != v.shape or t.dtype != v.dtype:
            raise CheckpointError(f"{folder}: tensor {k} is {t.dtype} {tuple(t.shape)}, "
                                  f"expected {v.dtype} {tuple(v.shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{folder}: tensor {k} holds NaN or infinite values")
    strip = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
    model.adapters.load_state_dict(strip("adapters."), strict=True)
    model.head.load_state_dict(strip("head."), strict=True)
