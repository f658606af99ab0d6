"""The encoder families the encoder models, as small tables: how each one's Hugging Face config.json
maps to `EncoderConfig` fields, what it has that the encoder does not model (refused by name), and how its
weight names map to ours.

Our weight names are BERT's (`layers.N.attention.self.query`, `...attention.output.dense/LayerNorm`,
`...intermediate.dense`, `...output.dense/LayerNorm`) for every family, so merging, BitFit and the
shared graph see the same projections q, k, v, o, ffn_in, ffn_out whatever the family.

- bert, roberta, xlm-roberta, electra: BERT's names (ELECTRA adds `embeddings_project`, embedding size ->
  hidden size, stored here as `embeddings.project`).
- distilbert: `transformer.layer.N.attention.{q,k,v,out}_lin`, `sa_layer_norm`, `ffn.lin1/lin2`,
  `output_layer_norm`; config names dim / n_layers / n_heads / hidden_dim / activation; no token types.
- deberta-v2 (also DeBERTa-v3): `attention.self.{query,key,value}_proj`, `pos_key_proj`/`pos_query_proj`
  (kept), `encoder.rel_embeddings` and `encoder.LayerNorm` (stored here as `relative.*`).
"""

from __future__ import annotations

import re

from .errors import BackboneError

BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra")
SUPPORTED_TYPES = (*BERT_LIKE, "distilbert", "deberta-v2")

# DistilBERT's config names -> ours (the rest have BERT's names)
DISTILBERT_CONFIG = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                     "hidden_dim": "intermediate_size", "activation": "hidden_act", "dropout": "hidden_dropout_prob",
                     "attention_dropout": "attention_probs_dropout_prob"}
DISTILBERT_FIXED = {"type_vocab_size": 0, "layer_norm_eps": 1e-12}  # DistilBERT: no token types, eps fixed in code

# per-layer sub-paths: Hugging Face -> ours
DISTILBERT_LAYER = {"attention.q_lin.": "attention.self.query.", "attention.k_lin.": "attention.self.key.",
                    "attention.v_lin.": "attention.self.value.", "attention.out_lin.": "attention.output.dense.",
                    "sa_layer_norm.": "attention.output.LayerNorm.", "ffn.lin1.": "intermediate.dense.",
                    "ffn.lin2.": "output.dense.", "output_layer_norm.": "output.LayerNorm."}
DEBERTA_LAYER = {"attention.self.query_proj.": "attention.self.query.", "attention.self.key_proj.": "attention.self.key.",
                 "attention.self.value_proj.": "attention.self.value."}
PREFIXES = ("bert.", "roberta.", "model.", "electra.", "distilbert.", "deberta.")
POS_ATT_TYPES = ("c2p", "p2c")


def translate(hf: dict) -> dict:
    """A Hugging Face config dict -> EncoderConfig keyword values (unknown keys are left for the caller to
    drop); raises BackboneError for a family or option the encoder does not model."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_TYPES:
        raise BackboneError(f"backbone model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
    if mt in BERT_LIKE:
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise BackboneError(f"position_embedding_type {pos!r} is not supported (only 'absolute')")
        return dict(hf)
    if mt == "distilbert":
        return _distilbert(hf)
    return _deberta(hf)


def _distilbert(hf: dict) -> dict:
    out = {DISTILBERT_CONFIG.get(k, k): v for k, v in hf.items()}
    return out | DISTILBERT_FIXED


def _deberta(hf: dict) -> dict:
    if (hf.get("conv_kernel_size") or 0) > 0:
        raise BackboneError(f"deberta-v2 conv_kernel_size {hf['conv_kernel_size']} (the convolution beside the "
                            "first layer, as in deberta-v2-xlarge) is not supported")
    heads, d = hf.get("num_attention_heads", 12), hf.get("hidden_size", 768)
    if hf.get("attention_head_size") not in (None, d // heads):
        raise BackboneError(f"deberta-v2 attention_head_size {hf['attention_head_size']} != hidden_size / heads "
                            f"({d // heads}) is not supported")
    pat = hf.get("pos_att_type") or ()
    pat = tuple(x.strip() for x in pat.lower().split("|")) if isinstance(pat, str) else tuple(x.lower() for x in pat)
    bad = [x for x in pat if x not in POS_ATT_TYPES]
    if bad:
        raise BackboneError(f"deberta-v2 pos_att_type {bad} is not supported; supported: {', '.join(POS_ATT_TYPES)}")
    norm = tuple(x.strip() for x in str(hf.get("norm_rel_ebd") or "none").lower().split("|"))
    if any(x not in ("none", "layer_norm") for x in norm):
        raise BackboneError(f"deberta-v2 norm_rel_ebd {hf['norm_rel_ebd']!r} is not supported "
                            "(only 'none' or 'layer_norm')")
    return dict(hf) | {"pos_att_type": tuple(x for x in POS_ATT_TYPES if x in pat),
                       "norm_rel_ebd": "layer_norm" if "layer_norm" in norm else "none"}


def hf_to_encoder_key(key: str, model_type: str = "bert", position_biased_input: bool = True) -> str | None:
    """Map a Hugging Face weight name of `model_type` to ours (None: not part of the encoder)."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key.startswith("embeddings."):
        if key.endswith(("position_ids", "token_type_ids")):
            return None
        if key.startswith("embeddings.position_embeddings.") and not position_biased_input:
            return None  # DeBERTa-v2 ignores it too (_keys_to_ignore_on_load_unexpected)
        return key
    if key.startswith("embeddings_project.") and model_type == "electra":
        return "embeddings.project." + key[len("embeddings_project."):]
    if model_type == "deberta-v2" and key.startswith(("encoder.rel_embeddings.", "encoder.LayerNorm.")):
        return "relative." + key[len("encoder."):]
    layer_prefix = "transformer.layer." if model_type == "distilbert" else "encoder.layer."
    m = re.match(re.escape(layer_prefix) + r"(\d+)\.(.*)", key)
    if m is None:
        return None
    i, rest = m.groups()
    table = DISTILBERT_LAYER if model_type == "distilbert" else DEBERTA_LAYER if model_type == "deberta-v2" else {}
    for src, dst in table.items():
        if rest.startswith(src):
            rest = dst + rest[len(src):]
            break
    return f"layers.{i}.{rest}"
