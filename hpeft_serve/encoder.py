"""An export-friendly encoder for the BERT family (BERT, RoBERTa, XLM-R; MiniLM is a BERT).

It loads Hugging Face weights (same parameter names as `transformers`' BertModel/RobertaModel, with
`encoder.layer.N` renamed `layers.N`) and is held equal to `transformers.AutoModel` in the tests. It is
written with plain tensor ops so that `torch.onnx.export` and `torch.jit.trace` see every op.

Each layer calls its adapters through `LayerHooks`: the base class adds nothing (the plain backbone);
`hpeft_serve.methods.adapter_set.LayerAdapters` adds LoRA, prefix, bottleneck/PHM/sparse adapters,
gates and BitFit bias deltas. The backbone weights themselves are never changed by an adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BackboneError

SUPPORTED_TYPES = ("bert", "roberta", "xlm-roberta")
ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


@dataclass(frozen=True)
class EncoderConfig:
    """The fields of a Hugging Face config.json that the encoder needs."""

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_hf(cls, hf: dict) -> "EncoderConfig":
        """Read a Hugging Face config dict; refuse architectures and options the encoder does not model."""
        mt = hf.get("model_type")
        if mt not in SUPPORTED_TYPES:
            raise BackboneError(f"backbone model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise BackboneError(f"position_embedding_type {pos!r} is not supported (only 'absolute')")
        if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise BackboneError(f"hidden_act {hf.get('hidden_act')!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in hf.items() if k in names and v is not None}
        return cls(**kw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_roberta(self) -> bool:
        return self.model_type in ("roberta", "xlm-roberta")


class LayerContext:
    """What a layer passes to its hooks: the token mask (float [B, S, 1], 1 = real token) and the
    tensors shared across layers for this forward (this layer's prefix key/value, the PHM rule)."""

    def __init__(self, token_mask: torch.Tensor, shared: dict[str, torch.Tensor] | None = None):
        self.token_mask = token_mask
        self.shared = shared or {}


class LayerHooks(nn.Module):
    """The points where adapters enter a layer. This base class is the identity (plain backbone)."""

    def linear(self, name: str, x: torch.Tensor, layer: nn.Linear, ctx: LayerContext) -> torch.Tensor:
        """A frozen projection `name` in q, k, v, o, ffn_in, ffn_out."""
        return F.linear(x, layer.weight, layer.bias)

    def layer_norm(self, name: str, x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        """A frozen LayerNorm `name` in attn_ln, ffn_ln."""
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def prefix(self, x: torch.Tensor, ctx: LayerContext):
        """Extra key/value vectors: None, or (keys [B|1, P, D], values [B|1, P, D], additive mask [B|1, P] or None)."""
        return None

    def residual(self, site: str, h: torch.Tensor, a: torch.Tensor, ln: nn.LayerNorm, ctx: LayerContext) -> torch.Tensor:
        """Close a sub-layer (`site` attn or ffn): output h, input a -> LayerNorm(h + a) (+ adapters)."""
        return self.layer_norm(f"{site}_ln", h + a, ln)


class _SelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)


class _Output(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class _Attention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Output(c.hidden_size, c.hidden_size, c.layer_norm_eps)


class _Intermediate(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class EncoderLayer(nn.Module):
    """One post-LayerNorm transformer layer with adapter hooks."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.c = c
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Output(c.intermediate_size, c.hidden_size, c.layer_norm_eps)
        self.act = ACTIVATIONS[c.hidden_act]
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.attn_dropout = nn.Dropout(c.attention_probs_dropout_prob)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.c.num_attention_heads, self.c.head_dim).transpose(1, 2)  # (B, H, S, Dh)

    def attend(self, x: torch.Tensor, mask_add: torch.Tensor, ctx: LayerContext, hooks: LayerHooks) -> torch.Tensor:
        sa = self.attention.self
        b = x.shape[0]
        q = hooks.linear("q", x, sa.query, ctx)
        k = hooks.linear("k", x, sa.key, ctx)
        v = hooks.linear("v", x, sa.value, ctx)
        pre = hooks.prefix(x, ctx)
        if pre is not None:
            pk, pv, pmask = pre
            k = torch.cat([pk.expand(b, -1, -1), k], dim=1)  # (B, P+S, D)
            v = torch.cat([pv.expand(b, -1, -1), v], dim=1)
            if pmask is None:
                pmask = mask_add.new_zeros(1, pk.shape[1])
            mask_add = torch.cat([pmask.expand(b, -1)[:, None, None, :], mask_add], dim=-1)  # (B, 1, 1, P+S)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(self.c.head_dim)) + mask_add  # (B, H, S, P+S)
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))
        out = (probs @ v).transpose(1, 2)  # (B, S, H, Dh)
        return out.reshape(b, out.shape[1], self.c.hidden_size)

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor, ctx: LayerContext, hooks: LayerHooks) -> torch.Tensor:
        att = self.attend(x, mask_add, ctx, hooks)
        h = self.dropout(hooks.linear("o", att, self.attention.output.dense, ctx))
        x1 = hooks.residual("attn", h, x, self.attention.output.LayerNorm, ctx)
        inter = self.act(hooks.linear("ffn_in", x1, self.intermediate.dense, ctx))
        h2 = self.dropout(hooks.linear("ffn_out", inter, self.output.dense, ctx))
        return hooks.residual("ffn", h2, x1, self.output.LayerNorm, ctx)


class Embeddings(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.c = c
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(max(c.type_vocab_size, 1), c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def position_ids(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Positions of the tokens; `offset` shifts them as Hugging Face does after past key/values."""
        if self.c.is_roberta:  # RoBERTa counts positions from padding_idx + 1, skipping pad tokens
            m = (input_ids != self.c.pad_token_id).long()
            return (torch.cumsum(m, dim=1) + offset) * m + self.c.pad_token_id
        s = input_ids.shape[1]
        return torch.arange(offset, offset + s, device=input_ids.device).unsqueeze(0)

    def forward(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids(input_ids, offset))
        x = x + self.token_type_embeddings.weight[0]  # token_type_ids are all zero
        return self.dropout(self.LayerNorm(x))


class Encoder(nn.Module):
    """Embeddings + layers; returns the last hidden state (B, S, D). Weights are frozen by the caller."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.config = c
        self.embeddings = Embeddings(c)
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_hidden_layers))
        self.plain = LayerHooks()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters=None) -> torch.Tensor:
        x = self.embeddings(input_ids, getattr(adapters, "position_offset", 0))
        m = attention_mask.to(x.dtype)
        mask_add = ((1.0 - m) * torch.finfo(x.dtype).min)[:, None, None, :]  # (B, 1, 1, S)
        token_mask = m.unsqueeze(-1)  # (B, S, 1)
        shared = adapters.shared_tensors() if adapters is not None else [{}] * len(self.layers)
        for i, layer in enumerate(self.layers):
            hooks = adapters.layers[i] if adapters is not None else self.plain
            x = layer(x, mask_add, LayerContext(token_mask, shared[i]), hooks)
        return x


def hf_to_encoder_key(key: str) -> str | None:
    """Map a Hugging Face BertModel/RobertaModel weight name to ours (None: not part of the encoder)."""
    for prefix in ("bert.", "roberta.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("encoder.layer."):
        return "layers." + key[len("encoder.layer."):]
    if key.startswith("embeddings.") and not key.endswith("position_ids") and not key.endswith("token_type_ids"):
        return key
    return None
