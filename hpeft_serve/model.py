"""A classifier: the frozen encoder, one adapter set, and a classification head.

Head (AdapterHub's flex head): dense + tanh + linear on a pooled vector -- the first token (cls) or the
mean over real tokens (mean, the sentence-transformers pooling that MiniLM was trained with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .encoder import Encoder
from .methods.adapter_set import AdapterSet
from .methods.config import MethodConfig
from .methods.functional import token_mean


@dataclass(frozen=True)
class HeadConfig:
    num_labels: int
    pooling: str = "mean"
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return {"num_labels": self.num_labels, "pooling": self.pooling, "dropout": self.dropout}


class ClassificationHead(nn.Module):
    def __init__(self, d: int, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout)
        self.dense = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, cfg.num_labels)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.pooling == "cls":
            x = h[:, 0]
        else:
            x = token_mean(h, attention_mask.to(h.dtype).unsqueeze(-1)).squeeze(1)  # (B, D)
        x = torch.tanh(self.dense(self.dropout(x)))
        return self.out_proj(self.dropout(x))


class HybridModel(nn.Module):
    """logits = head(encoder(input_ids, attention_mask; adapters))."""

    def __init__(self, encoder: Encoder, method: MethodConfig, head: HeadConfig):
        super().__init__()
        self.encoder = encoder
        self.adapters = AdapterSet(method, encoder.config)
        self.head = ClassificationHead(encoder.config.hidden_size, head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask, self.adapters), attention_mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def freeze_backbone(self) -> "HybridModel":
        self.encoder.requires_grad_(False)
        self.adapters.requires_grad_(True)
        self.head.requires_grad_(True)
        return self
