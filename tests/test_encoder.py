"""The encoder equals transformers' AutoModel (last hidden state at real tokens, fp32, <= 1e-5) on padded
batches, for a tiny random BERT, RoBERTa and XLM-R and for the pretrained MiniLM; backbones resolve by name.

Padding positions are not compared: their outputs are not used by anything, and transformers' own eager and
SDPA attention differ there by ~1e-5."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, BertConfig, RobertaConfig, XLMRobertaConfig

from hpeft_serve.backbone import load_backbone, minilm_folder
from hpeft_serve.encoder import Encoder, EncoderConfig, hf_to_encoder_key
from hpeft_serve.errors import BackboneError

TOL = 1e-5


def _max_diff_at_tokens(a, b, mask):
    return ((a - b).abs() * mask[..., None]).max().item()


def _random_batch(vocab, pad, gen):
    ids = torch.randint(5, vocab, (4, 13), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in ((1, 7), (2, 2), (3, 10)):
        mask[row, n:] = 0
    ids[mask == 0] = pad
    return ids, mask


@pytest.mark.parametrize("hf_config", [
    BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96),
    RobertaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                  pad_token_id=1, max_position_embeddings=40, type_vocab_size=1),
    XLMRobertaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, pad_token_id=1, max_position_embeddings=40, hidden_act="gelu_new"),
], ids=["bert", "roberta", "xlm-roberta"])
def test_tiny_parity_with_transformers(hf_config):
    torch.manual_seed(0)
    hf = AutoModel.from_config(hf_config).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm params so every term is checked
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    enc = Encoder(EncoderConfig.from_hf(hf_config.to_dict())).eval()
    state = {hf_to_encoder_key(k): v for k, v in hf.state_dict().items() if hf_to_encoder_key(k)}
    missing, unexpected = enc.load_state_dict(state, strict=False)
    assert not unexpected and not missing
    for seed in range(3):
        ids, mask = _random_batch(hf_config.vocab_size, hf_config.pad_token_id, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
            out = enc(ids, mask)
        assert _max_diff_at_tokens(ref, out, mask) <= TOL


def test_minilm_parity_with_transformers():
    backbone = load_backbone("minilm")
    enc = backbone.build_encoder()
    hf = AutoModel.from_pretrained(str(minilm_folder())).eval()
    tok = backbone.tokenizer()
    batch = tok(["A three-hour cinema master class.", "Dull.",
                 "A dark, dull thriller with a parting shot that misfires, and a cast that deserved better."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        out = enc(batch["input_ids"], batch["attention_mask"])
    assert _max_diff_at_tokens(ref, out, batch["attention_mask"]) <= TOL
    assert backbone.config.hidden_size == 384 and backbone.config.num_hidden_layers == 6
    assert not any(p.requires_grad for p in enc.parameters())


def test_tiny_backbones_are_deterministic(tiny_bert, tiny_roberta):
    assert tiny_bert.sha256 != tiny_roberta.sha256
    a = tiny_bert.build_encoder().state_dict()
    b = tiny_bert.build_encoder().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_backbone_from_a_local_folder(tmp_path):
    src = minilm_folder()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json"):
        (tmp_path / f).symlink_to(src / f)
    b = load_backbone(str(tmp_path))
    assert b.sha256 == load_backbone("minilm").sha256
    assert b.config.hidden_size == 384


def test_backbone_errors(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone 'nope'"):
        load_backbone("nope")
    (tmp_path / "cfg").mkdir()
    with pytest.raises(BackboneError, match="no config.json"):
        load_backbone(str(tmp_path / "cfg"))
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(BackboneError, match="'gpt2' is not supported"):
        load_backbone(str(tmp_path / "cfg"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(BackboneError, match="unpickling"):
        load_backbone(str(tmp_path / "bin"))
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "config.json").write_text(json.dumps({"model_type": "bert",
                                                              "position_embedding_type": "relative_key"}))
    with pytest.raises(BackboneError, match="relative_key"):
        load_backbone(str(tmp_path / "rel"))
