"""DeBERTa-v2/v3's disentangled attention (He et al., 2021, "DeBERTa: Decoding-enhanced BERT with
Disentangled Attention"; v3: He et al., 2023) on top of the encoder's BERT layer.

scores = (q k^T + c2p + p2c) / sqrt(Dh * (1 + #pos_att_type)), where for query i and key j
  c2p[i, j] = q_i . pos_k[c2p_idx[i, j]],   pos_k = key projection of the relative embeddings,
  p2c[i, j] = k_j . pos_q[p2c_idx[j, i]],   pos_q = query projection of the relative embeddings,
  c2p_idx = clamp(bucket(i - j) + A, 0, 2A - 1), p2c_idx = clamp(-bucket(i - j) + A, 0, 2A - 1),
A the attention span (position_buckets if > 0, else max_relative_positions, else max_position_embeddings)
and bucket() the log bucketing of relative distances (identity without buckets).

With share_att_key the relative embeddings go through the layer's own (adapted) q and k projections, so
LoRA and BitFit on q/k reach them, as in transformers (peft, AdapterHub wrap the same projections).
A prefix (prefix tuning) gets no relative term: its columns of c2p/p2c are zero, as AdapterHub pads them.
DeBERTa masks (query, key) pairs, not keys alone: a padding query's scores are all masked, so it attends
uniformly to every position (with a prefix: to the prefix alone, whose mask AdapterHub leaves open). Only the
padding positions' outputs change, and they matter where something pools over every position (AdapterHub's
gates: gate_pooling "all"), so `attend` builds that (B, 1, S, S) mask.
The bucket table is computed once, with transformers' own float formula, for every distance up to
max_position_embeddings, so ONNX gathers integers instead of recomputing logs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import EncoderConfig, EncoderLayer, LayerContext, LayerHooks


def log_buckets(rel: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """DeBERTa's log bucket of relative distances `rel` (long), the same float ops as transformers."""
    sign = torch.sign(rel)
    mid = bucket_size // 2
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.tensor(mid - 1).type_as(rel), torch.abs(rel))
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, rel.type_as(log_pos), log_pos * sign).long()


class Relative(nn.Module):
    """The relative embeddings (2A, D), their LayerNorm (norm_rel_ebd "layer_norm") and the index tables."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.span = c.attention_span
        self.rel_embeddings = nn.Embedding(2 * self.span, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) if c.norm_rel_ebd == "layer_norm" else None
        self.dropout = nn.Dropout(c.hidden_dropout_prob)  # transformers' pos_dropout
        n = c.max_position_embeddings
        rel = torch.arange(-(n - 1), n)  # every distance i - j of sequences up to n tokens
        b = log_buckets(rel, c.position_buckets, c.max_relative) if c.position_buckets > 0 else rel
        self.offset = n - 1
        self.register_buffer("c2p_table", torch.clamp(b + self.span, 0, 2 * self.span - 1), persistent=False)
        self.register_buffer("p2c_table", torch.clamp(-b + self.span, 0, 2 * self.span - 1), persistent=False)

    def forward(self, s_len: int, ref: torch.Tensor) -> dict[str, torch.Tensor]:
        """For a sequence of s_len tokens: embeddings (1, 2A, D) and c2p/p2c indices (S, S)."""
        ar = torch.arange(s_len, device=ref.device)
        rel = ar[:, None] - ar[None, :] + self.offset  # (S, S): i - j, shifted into the tables
        emb = self.rel_embeddings.weight
        if self.LayerNorm is not None:
            emb = self.LayerNorm(emb)
        return {"emb": self.dropout(emb).unsqueeze(0), "c2p": self.c2p_table[rel], "p2c": self.p2c_table[rel]}


def _relative_ctx(ctx: LayerContext, emb: torch.Tensor) -> LayerContext:
    """The context for projecting the relative embeddings: every one of the 2A positions is 'real'."""
    ones = emb.new_ones(1, emb.shape[1], 1)
    shared = {k: ones if k == "gate_token_mask" else v for k, v in ctx.shared.items()}
    return LayerContext(ones, shared)


class DebertaLayer(EncoderLayer):
    """A BERT layer whose attention scores add DeBERTa's c2p / p2c terms."""

    def __init__(self, c: EncoderConfig):
        super().__init__(c)
        self.pos_att_type = c.pos_att_type if c.relative_attention else ()
        self.scale = 1.0 / math.sqrt(c.head_dim * (1 + len(self.pos_att_type)))
        sa = self.attention.self
        if self.pos_att_type and not c.share_att_key:
            if "c2p" in self.pos_att_type:
                sa.pos_key_proj = nn.Linear(c.hidden_size, c.hidden_size)
            if "p2c" in self.pos_att_type:
                sa.pos_query_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def query_mask(self, mask_add: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """DeBERTa's (query, key) mask: padding rows masked whole, (B, 1, S, S)."""
        rows = (1.0 - ctx.token_mask).unsqueeze(1) * torch.finfo(mask_add.dtype).min  # (B, 1, S, 1)
        return torch.minimum(mask_add, rows)  # min where the query or the key is padding

    def _pos_proj(self, which: str, ctx: LayerContext, hooks: LayerHooks) -> torch.Tensor:
        """(1|B, H, 2A, Dh): the relative embeddings through the q or k projection (shared) or their own."""
        sa, emb = self.attention.self, ctx.relative["emb"]
        if self.c.share_att_key:
            layer = sa.query if which == "q" else sa.key
            p = hooks.linear(which, emb, layer, _relative_ctx(ctx, emb))
        else:
            layer = sa.pos_query_proj if which == "q" else sa.pos_key_proj
            p = F.linear(emb, layer.weight, layer.bias)
        return self._heads(p)

    def position_bias(self, q: torch.Tensor, k: torch.Tensor, ctx: LayerContext, hooks: LayerHooks):
        """(B, H, S, S) added to q k^T before scaling: c2p + p2c (q, k: (B, H, S, Dh), k without prefix)."""
        if not self.pos_att_type:
            return None
        b, h, s, _ = q.shape
        bias = 0.0
        if "c2p" in self.pos_att_type:
            c2p = q @ self._pos_proj("k", ctx, hooks).transpose(-1, -2)  # (B, H, S, 2A)
            bias = bias + torch.gather(c2p, -1, ctx.relative["c2p"].expand(b, h, s, s))
        if "p2c" in self.pos_att_type:
            p2c = k @ self._pos_proj("q", ctx, hooks).transpose(-1, -2)  # (B, H, S_k, 2A)
            bias = bias + torch.gather(p2c, -1, ctx.relative["p2c"].expand(b, h, s, s)).transpose(-1, -2)
        return bias
