"""DistilBERT, ELECTRA and DeBERTa-v2/v3: the encoder equals transformers' AutoModel (last hidden state at
real tokens, fp32, <= 1e-5) on padded batches of mixed lengths, for tiny random configs covering each
family's options (ELECTRA's embedding projection; DeBERTa's relative buckets, shared or own position
projections, c2p/p2c, position_biased_input, embed_proj, the v3 settings); what is not modelled is refused
by name; the tiny backbones resolve by name and load from a saved Hugging Face folder."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, DebertaV2Config, DistilBertConfig, ElectraConfig

from hpeft_serve.backbone import load_backbone
from hpeft_serve.encoder import Encoder, EncoderConfig, hf_to_encoder_key
from hpeft_serve.errors import BackboneError

from .test_encoder import TOL, _max_diff_at_tokens, _random_batch

SMALL = {"vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 96}
V3 = {"relative_attention": True, "position_buckets": 256, "max_relative_positions": -1, "norm_rel_ebd": "layer_norm",
      "share_att_key": True, "pos_att_type": "p2c|c2p", "position_biased_input": False, "type_vocab_size": 0,
      "layer_norm_eps": 1e-7}
CASES = {
    "distilbert": DistilBertConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, hidden_dim=96,
                                   max_position_embeddings=40),
    "distilbert-relu": DistilBertConfig(vocab_size=120, dim=64, n_layers=2, n_heads=4, hidden_dim=96,
                                        max_position_embeddings=40, activation="relu"),
    "electra-projected": ElectraConfig(**SMALL, embedding_size=32, max_position_embeddings=40),
    "electra": ElectraConfig(**SMALL, embedding_size=64, max_position_embeddings=40),
    "deberta-v3": DebertaV2Config(**SMALL, **V3, max_position_embeddings=512),  # long batch: log buckets
    "deberta-v3-small-buckets": DebertaV2Config(**SMALL, **(V3 | {"position_buckets": 8, "max_relative_positions": 24}),
                                                max_position_embeddings=40),
    "deberta-v2-own-pos-proj": DebertaV2Config(**SMALL, relative_attention=True, position_buckets=8,
                                               max_relative_positions=32, pos_att_type=["c2p", "p2c"],
                                               position_biased_input=True, type_vocab_size=2, embedding_size=32,
                                               max_position_embeddings=40),
    "deberta-v2-c2p-clamped": DebertaV2Config(**SMALL, relative_attention=True, max_relative_positions=5,
                                              pos_att_type="c2p", position_biased_input=True,
                                              max_position_embeddings=40),
    "deberta-v2-p2c-shared": DebertaV2Config(**SMALL, relative_attention=True, max_relative_positions=6,
                                             pos_att_type="p2c", share_att_key=True, max_position_embeddings=40),
    "deberta-absolute-only": DebertaV2Config(**SMALL, relative_attention=False, max_position_embeddings=40),
}


def _hf_and_ours(hf_config):
    torch.manual_seed(0)
    hf = AutoModel.from_config(hf_config).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm params so every term is checked
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n.lower():
                p.add_(torch.randn_like(p) * 0.1)
    c = EncoderConfig.from_hf(hf_config.to_dict())
    enc = Encoder(c).eval()
    state = {hf_to_encoder_key(k, c): v for k, v in hf.state_dict().items() if hf_to_encoder_key(k, c)}
    missing, unexpected = enc.load_state_dict(state, strict=False)
    assert not unexpected and not missing
    return hf, enc


def _long_batch(vocab, pad, gen):
    ids = torch.randint(5, vocab, (3, 150), generator=gen)  # > 128 tokens: DeBERTa-v3's log buckets (mid 128)
    mask = torch.ones_like(ids)
    mask[1, 131:] = 0
    mask[2, 9:] = 0
    ids[mask == 0] = pad
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_family_parity_with_transformers(case):
    hf_config = CASES[case]
    hf, enc = _hf_and_ours(hf_config)
    batches = [_random_batch(hf_config.vocab_size, hf_config.pad_token_id, torch.Generator().manual_seed(s))
               for s in range(3)]
    if hf_config.max_position_embeddings > 150:
        batches.append(_long_batch(hf_config.vocab_size, hf_config.pad_token_id, torch.Generator().manual_seed(7)))
    for ids, mask in batches:
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
            out = enc(ids, mask)
        assert _max_diff_at_tokens(ref, out, mask) <= TOL


@pytest.mark.parametrize("name", ["tiny-distilbert", "tiny-electra", "tiny-deberta-v2"])
def test_tiny_family_backbones(name, tmp_path):
    """Seeded, distinct, tokenised by MiniLM's tokenizer; saved as a Hugging Face folder (config.json +
    model.safetensors written by transformers) they load back to the same encoder, equal to AutoModel."""
    from safetensors.torch import save_file
    b = load_backbone(name)
    assert b.config.hidden_size >= 128 and b.config.num_hidden_layers == 2
    enc = b.build_encoder()
    assert b.sha256 == load_backbone(name).sha256 != load_backbone("tiny-bert").sha256
    tok = b.tokenizer()
    batch = tok(["a good film", "the plot was awful and the actors were very dull", "fine"], padding=True,
                return_tensors="pt")
    import transformers
    cls, kw = __import__("hpeft_serve.backbone", fromlist=["TINY_HF"]).TINY_HF[name]
    hf = AutoModel.from_config(getattr(transformers, cls)(vocab_size=30522, max_position_embeddings=512, **kw)).eval()
    ours = enc.state_dict()
    hf_state = {k: ours[hf_to_encoder_key(k, b.config)].clone() for k in hf.state_dict()
                if hf_to_encoder_key(k, b.config)}
    hf.load_state_dict(hf_state, strict=False)
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    tok.save_pretrained(str(tmp_path))
    folder = load_backbone(str(tmp_path))
    assert folder.config == b.config
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        out = folder.build_encoder()(batch["input_ids"], batch["attention_mask"])
        mine = enc(batch["input_ids"], batch["attention_mask"])
    assert _max_diff_at_tokens(ref, out, batch["attention_mask"]) <= TOL
    assert torch.equal(out, mine)


@pytest.mark.parametrize("hf, match", [
    ({"model_type": "deberta-v2", "conv_kernel_size": 3}, "conv_kernel_size 3"),
    ({"model_type": "deberta-v2", "pos_att_type": "p2p|c2p"}, r"pos_att_type \['p2p'\]"),
    ({"model_type": "deberta-v2", "norm_rel_ebd": "layer_norm|scale"}, "norm_rel_ebd 'layer_norm|scale'"),
    ({"model_type": "deberta-v2", "hidden_size": 64, "num_attention_heads": 4, "attention_head_size": 8},
     "attention_head_size 8"),
    ({"model_type": "deberta"}, "'deberta' is not supported"),
    ({"model_type": "albert"}, "'albert' is not supported"),
    ({"model_type": "electra", "position_embedding_type": "relative_key"}, "relative_key"),
    ({"model_type": "distilbert", "activation": "mish"}, "hidden_act 'mish'"),
])
def test_what_is_not_modelled_is_refused(hf, match, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(BackboneError, match=match):
        load_backbone(str(tmp_path))


@pytest.mark.parametrize("name", ["tiny-distilbert", "tiny-deberta-v2"])
def test_shifted_prefix_positions_are_refused(name):
    from hpeft_serve.methods.presets import resolve
    from hpeft_serve.model import HeadConfig
    from hpeft_serve.training import build_model
    b = load_backbone(name)
    model = build_model(b, resolve("prefix", 2, {}), HeadConfig(2), 0)
    model.adapters.position_offset = 3  # what a peft prefix-tuning import sets
    with pytest.raises(BackboneError, match=f"not supported on {b.config.model_type}"):
        model(torch.tensor([[101, 2000, 102]]), torch.ones(1, 3, dtype=torch.long))
