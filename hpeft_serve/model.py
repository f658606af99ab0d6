"""A classifier or an embedder: the frozen encoder, one adapter set, and a head.

Classification head (AdapterHub's flex head): dense + tanh + linear on a pooled vector -- the first token
(cls) or the mean over real tokens (mean, the sentence-transformers pooling that MiniLM was trained with).
Embedding head (sentence-transformers' Pooling + Normalize): the pooled vector itself -- mean over real
tokens, first token (cls) or max over real tokens -- optionally L2-normalised; it has no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import Encoder
from .errors import ConfigError
from .methods.adapter_set import AdapterSet
from .methods.config import MethodConfig
from .methods.functional import token_mean


TASKS = ("classification", "embedding")
POOLINGS = {"classification": ("mean", "cls"), "embedding": ("mean", "cls", "max")}


@dataclass(frozen=True)
class HeadConfig:
    num_labels: int
    """classification: the number of labels; embedding: 0"""
    pooling: str = "mean"
    """mean (over real tokens), cls (first token), max (over real tokens; embedding only)"""
    dropout: float = 0.1
    task: str = "classification"
    """classification (logits [batch, labels]) or embedding (embeddings [batch, hidden])"""
    normalize: bool = False
    """embedding: L2-normalise the pooled vector (sentence-transformers' Normalize)"""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"head task {self.task!r} is unknown; allowed: {', '.join(TASKS)}")
        if self.pooling not in POOLINGS[self.task]:
            raise ConfigError(f"pooling {self.pooling!r} is not available for a {self.task} head; allowed: "
                              f"{', '.join(POOLINGS[self.task])}")
        if (self.task == "embedding") != (self.num_labels == 0):
            raise ConfigError(f"a {self.task} head needs num_labels {'0' if self.task == 'embedding' else '>= 1'}, "
                              f"got {self.num_labels}")
        if self.normalize and self.task != "embedding":
            raise ConfigError("normalize applies to embedding heads only")

    @property
    def embedding(self) -> bool:
        return self.task == "embedding"

    def to_dict(self) -> dict:
        return {"num_labels": self.num_labels, "pooling": self.pooling, "dropout": self.dropout, "task": self.task,
                "normalize": self.normalize}


def pool(h: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, S, D) hidden states -> (B, D): mean or max over real tokens, or the first token."""
    if pooling == "cls":
        return h[:, 0]
    m = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, S, 1)
    if pooling == "max":  # padding can never win: it is pushed to the lowest float first
        return (h + (1.0 - m) * torch.finfo(h.dtype).min).amax(dim=1)
    return token_mean(h, m).squeeze(1)


class ClassificationHead(nn.Module):
    def __init__(self, d: int, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout)
        self.dense = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, cfg.num_labels)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = pool(h, attention_mask, self.cfg.pooling)
        x = torch.tanh(self.dense(self.dropout(x)))
        return self.out_proj(self.dropout(x))


class EmbeddingHead(nn.Module):
    """The sentence embedding [B, D]: pooled, then L2-normalised if the config says so (no parameters)."""

    def __init__(self, d: int, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = pool(h, attention_mask, self.cfg.pooling)
        return F.normalize(x, p=2.0, dim=-1) if self.cfg.normalize else x


class HybridModel(nn.Module):
    """logits (or embeddings) = head(encoder(input_ids, attention_mask; adapters))."""

    def __init__(self, encoder: Encoder, method: MethodConfig, head: HeadConfig):
        super().__init__()
        self.encoder = encoder
        self.adapters = AdapterSet(method, encoder.config)
        self.head = (EmbeddingHead if head.embedding else ClassificationHead)(encoder.config.hidden_size, head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask, self.adapters), attention_mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def freeze_backbone(self) -> "HybridModel":
        self.encoder.requires_grad_(False)
        self.adapters.requires_grad_(True)
        self.head.requires_grad_(True)
        return self
