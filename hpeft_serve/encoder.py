"""An export-friendly encoder for the BERT family (BERT, RoBERTa, XLM-R; MiniLM is a BERT), ELECTRA,
DistilBERT and DeBERTa-v2/v3 (disentangled attention: hpeft_serve/encoder_deberta.py).

It loads Hugging Face weights (BERT's parameter names, with `encoder.layer.N` renamed `layers.N`; the other
families' names are mapped onto them, hpeft_serve/encoder_families.py) and is held equal to
`transformers.AutoModel` in the tests. It is written with plain tensor ops so that `torch.onnx.export` and
`torch.jit.trace` see every op.

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

from . import encoder_families as families
from .errors import BackboneError

SUPPORTED_TYPES = families.SUPPORTED_TYPES
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
    embedding_size: int = 0  # ELECTRA, DeBERTa: token embedding width, projected to hidden_size (0: hidden_size)
    position_biased_input: bool = True  # DeBERTa: absolute position embeddings added to the input
    relative_attention: bool = False  # DeBERTa: disentangled attention with relative positions
    max_relative_positions: int = -1  # DeBERTa: < 1 means max_position_embeddings
    position_buckets: int = -1  # DeBERTa: log buckets of relative distances (v3: 256); <= 0: none
    pos_att_type: tuple = ()  # DeBERTa: relative terms, among c2p p2c
    share_att_key: bool = False  # DeBERTa: relative embeddings projected by the layer's own q and k
    norm_rel_ebd: str = "none"  # DeBERTa: "layer_norm" normalises the relative embeddings

    @classmethod
    def from_hf(cls, hf: dict) -> "EncoderConfig":
        """Read a Hugging Face config dict; refuse architectures and options the encoder does not model."""
        hf = families.translate(hf)
        if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise BackboneError(f"hidden_act {hf.get('hidden_act')!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in hf.items() if k in names and v is not None}
        return cls(**kw)

    @property
    def embedding_dim(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def max_relative(self) -> int:
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def attention_span(self) -> int:
        """DeBERTa: relative embeddings are 2 x this many."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_roberta(self) -> bool:
        return self.model_type in ("roberta", "xlm-roberta")


class LayerContext:
    """What a layer passes to its hooks: the token mask (float [B, S, 1], 1 = real token) and the
    tensors shared across layers for this forward (this layer's prefix key/value, the PHM rule), and for
    DeBERTa the relative embeddings and index tables of this sequence length."""

    def __init__(self, token_mask: torch.Tensor, shared: dict[str, torch.Tensor] | None = None,
                 relative: dict[str, torch.Tensor] | None = None):
        self.token_mask = token_mask
        self.shared = shared or {}
        self.relative = relative


class LayerHooks(nn.Module):
    """The points where adapters enter a layer. This base class is the identity (plain backbone)."""

    def linear(self, name: str, x: torch.Tensor, layer: nn.Linear, ctx: LayerContext) -> torch.Tensor:
        """A frozen projection `name` in q, k, v, o, ffn_in, ffn_out."""
        return F.linear(x, layer.weight, layer.bias)

    def linear_act(self, name: str, x: torch.Tensor, layer: nn.Linear, act, ctx: LayerContext) -> torch.Tensor:
        """act(linear(name, x)): the FFN's input projection and its activation."""
        return act(self.linear(name, x, layer, ctx))

    def layer_norm(self, name: str, x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        """A frozen LayerNorm `name` in attn_ln, ffn_ln."""
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def prefix(self, x: torch.Tensor, ctx: LayerContext):
        """Extra key/value vectors: None, or (keys [B|1, P, D], values [B|1, P, D], additive mask [B|1, P] or None)."""
        return None

    def prefix_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pre: tuple, mask_add: torch.Tensor,
                         scale: float) -> torch.Tensor | None:
        """The attention output (B, H, S, Dh) of a layer whose `prefix` gave `pre` (keys, values [B, P, D], mask
        [B, P]), when the hooks compute it themselves (the shared graph: only the rows that have a prefix attend
        to its positions), or None: every row attends to prefix + tokens (q, k, v: (B, H, S, Dh); mask_add
        (B, 1, 1, S); asked only when the layer adds no position bias)."""
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
        self.scale = 1.0 / math.sqrt(c.head_dim)

    def position_bias(self, q: torch.Tensor, k: torch.Tensor, ctx: LayerContext, hooks: LayerHooks):
        """A term added to q k^T before scaling (B, H, S, S), or None (BERT: none; DeBERTa overrides)."""
        return None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.c.num_attention_heads, self.c.head_dim).transpose(1, 2)  # (B, H, S, Dh)

    def query_mask(self, mask_add: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """The additive key mask (B, 1, 1, S) as this family applies it; DeBERTa masks (query, key) pairs."""
        return mask_add

    def attend(self, x: torch.Tensor, mask_add: torch.Tensor, ctx: LayerContext, hooks: LayerHooks) -> torch.Tensor:
        sa = self.attention.self
        b = x.shape[0]
        q = hooks.linear("q", x, sa.query, ctx)
        k = hooks.linear("k", x, sa.key, ctx)
        v = hooks.linear("v", x, sa.value, ctx)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, H, S, Dh)
        bias = self.position_bias(q, k, ctx, hooks)
        mask_add = self.query_mask(mask_add, ctx)  # (B, 1, 1 or S, S)
        pre = hooks.prefix(x, ctx)
        if pre is not None and bias is None and mask_add.shape[2] == 1:
            out = hooks.prefix_attention(q, k, v, pre, mask_add, self.scale)
            if out is not None:
                out = out.transpose(1, 2)  # (B, S, H, Dh)
                return out.reshape(b, out.shape[1], self.c.hidden_size)
        if pre is not None:
            pk, pv, pmask = pre
            if pk.shape[0] == 1:  # one prefix for every row (a per-row one, [B, P, D], needs no Expand copy)
                pk, pv = pk.expand(b, -1, -1), pv.expand(b, -1, -1)
            k = torch.cat([self._heads(pk), k], dim=2)  # (B, H, P+S, Dh)
            v = torch.cat([self._heads(pv), v], dim=2)
            if pmask is None:
                pmask = mask_add.new_zeros(1, pk.shape[1])
            pmask = pmask.expand(b, -1)[:, None, None, :].expand(-1, -1, mask_add.shape[2], -1)  # open to every row
            mask_add = torch.cat([pmask, mask_add], dim=-1)  # (B, 1, 1 or S, P+S)
            if bias is not None:  # the prefix has no position: zero relative terms in its columns
                bias = F.pad(bias, (pk.shape[1], 0))
        scores = q @ k.transpose(-1, -2)  # (B, H, S, P+S)
        if bias is not None:
            scores = scores + bias
        scores = scores * self.scale + mask_add
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))
        out = (probs @ v).transpose(1, 2)  # (B, S, H, Dh)
        return out.reshape(b, out.shape[1], self.c.hidden_size)

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor, ctx: LayerContext, hooks: LayerHooks) -> torch.Tensor:
        att = self.attend(x, mask_add, ctx, hooks)
        h = self.dropout(hooks.linear("o", att, self.attention.output.dense, ctx))
        x1 = hooks.residual("attn", h, x, self.attention.output.LayerNorm, ctx)
        inter = hooks.linear_act("ffn_in", x1, self.intermediate.dense, self.act, ctx)
        h2 = self.dropout(hooks.linear("ffn_out", inter, self.output.dense, ctx))
        return hooks.residual("ffn", h2, x1, self.output.LayerNorm, ctx)


class Embeddings(nn.Module):
    """word (+ position) (+ token type 0) -> LayerNorm -> dropout, at width embedding_dim; a projection to
    hidden_size where embedding_dim differs: DeBERTa's embed_proj before the LayerNorm (no bias), ELECTRA's
    embeddings_project after the dropout. DeBERTa zeroes padding tokens' embeddings."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.c = c
        e, deberta = c.embedding_dim, c.model_type == "deberta-v2"
        self.word_embeddings = nn.Embedding(c.vocab_size, e, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, e) if c.position_biased_input else None
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, e) if c.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(e, c.hidden_size, bias=False) if deberta and e != c.hidden_size else None
        self.LayerNorm = nn.LayerNorm(c.hidden_size if deberta else e, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.project = nn.Linear(e, c.hidden_size) if not deberta and e != c.hidden_size else None

    def position_ids(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Positions of the tokens; `offset` shifts them as Hugging Face does after past key/values."""
        if self.c.is_roberta:  # RoBERTa counts positions from padding_idx + 1, skipping pad tokens
            m = (input_ids != self.c.pad_token_id).long()
            return (torch.cumsum(m, dim=1) + offset) * m + self.c.pad_token_id
        s = input_ids.shape[1]
        return torch.arange(offset, offset + s, device=input_ids.device).unsqueeze(0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(self.position_ids(input_ids, offset))
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings.weight[0]  # token_type_ids are all zero
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.LayerNorm(x)
        if self.c.model_type == "deberta-v2":
            x = x * attention_mask.to(x.dtype).unsqueeze(-1)  # (B, S, D)
        x = self.dropout(x)
        return x if self.project is None else self.project(x)


class Encoder(nn.Module):
    """Embeddings + layers; returns the last hidden state (B, S, D). Weights are frozen by the caller."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.config = c
        self.embeddings = Embeddings(c)
        layer, self.relative = EncoderLayer, None
        if c.model_type == "deberta-v2":
            from .encoder_deberta import DebertaLayer, Relative
            layer = DebertaLayer
            self.relative = Relative(c) if c.relative_attention else None
        self.layers = nn.ModuleList(layer(c) for _ in range(c.num_hidden_layers))
        self.plain = LayerHooks()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters=None) -> torch.Tensor:
        offset = getattr(adapters, "position_offset", 0)
        if offset and self.config.model_type in ("distilbert", "deberta-v2"):
            raise BackboneError(f"a prefix that shifts token positions (peft prefix tuning) is not supported on "
                                f"{self.config.model_type}: its attention takes no past key/values")
        x = self.embeddings(input_ids, attention_mask, offset)
        m = attention_mask.to(x.dtype)
        mask_add = ((1.0 - m) * torch.finfo(x.dtype).min)[:, None, None, :]  # (B, 1, 1, S)
        token_mask = m.unsqueeze(-1)  # (B, S, 1)
        shared = adapters.shared_tensors() if adapters is not None else [{}] * len(self.layers)
        relative = self.relative(input_ids.shape[1], x) if self.relative is not None else None
        for i, layer in enumerate(self.layers):
            hooks = adapters.layers[i] if adapters is not None else self.plain
            x = layer(x, mask_add, LayerContext(token_mask, shared[i], relative), hooks)
        return x


def hf_to_encoder_key(key: str, config: EncoderConfig | None = None) -> str | None:
    """Map a Hugging Face weight name of `config`'s family (default BERT) to ours (None: not part of the
    encoder)."""
    c = config or EncoderConfig()
    return families.hf_to_encoder_key(key, c.model_type, c.position_biased_input)
