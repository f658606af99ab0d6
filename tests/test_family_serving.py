"""A family's shared graph served for real: adapters imported from AdapterHub and peft onto a tiny DeBERTa-v3
backbone folder with its OWN tokenizer (a small WordPiece vocabulary, not MiniLM's), exported into ONE shared
graph, deployed, served by the real tritonserver and the REST gateway (both started here). A gRPC request
mixing the adapters row by row, the gateway's /v1/predict for each classifier and /v1/embeddings for the
embedding adapter all equal the PyTorch forward (fp32, <= 1e-5) of the imported checkpoints on the tokens of
the backbone's tokenizer -- which the gateway must use: MiniLM's ids would not fit the 200-word vocabulary.
(The PyTorch forward equals the libraries': tests/test_import_families.py.)"""

from __future__ import annotations

import json
import shutil
import urllib.request

import numpy as np
import pytest
import torch

import tritonclient.grpc as grpcclient

from exporters.export import export_checkpoint
from hpeft_serve import checkpoint
from hpeft_serve.gateway import GatewayThread, Settings
from hpeft_serve.importers import import_checkpoint
from hpeft_serve.serving.client import free_ports, hpeft_inputs
from hpeft_serve.serving.deploy import deploy
from hpeft_serve.serving.triton import TritonServer

from .test_import import GOLDEN, MANIFEST

TOL = 1e-5
ADAPTERS = ("ah-unipelt-deberta", "ah-prefix-deberta", "peft-lora-fe-deberta")  # gated hybrid, prefix, embedder
TEXTS = ["a good film", "the plot was dull and the actors were bored", "fine", "not good, not bad"]
WORDS = "a the good film plot was dull and actors were bored fine not bad , .".split()


def _backbone_with_tokenizer(folder):
    """The golden DeBERTa-v3 backbone (vocab 200) with a WordPiece tokenizer of its own, saved beside it."""
    from transformers import BertTokenizerFast
    shutil.copytree(GOLDEN / "backbones" / "deberta", folder)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS + letters),
             *(f"##{c}" for c in letters)]
    assert len(vocab) <= 200
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-serving")
    backbone = _backbone_with_tokenizer(root / "deberta")
    cks = {c: import_checkpoint(MANIFEST[c]["library"], GOLDEN / "cases" / c, str(backbone), root / "ck" / c,
                                log=lambda *_: None) for c in ADAPTERS}
    for ck in cks.values():
        export_checkpoint(ck, root / "export", "onnx", log=lambda *_: None)
    repo = root / "repo"
    deploy(root / "export", repo, log=lambda *_: None)
    http, grpc, metrics, gport = free_ports(4)
    triton = TritonServer(repo, http, grpc, metrics, work=root / "work").start()
    settings = Settings(repo=str(repo), triton=f"127.0.0.1:{grpc}",
                        triton_metrics=f"http://127.0.0.1:{metrics}/metrics", max_tokens=64)
    gw = GatewayThread(settings, "127.0.0.1", gport).start()
    from transformers import AutoTokenizer
    yield {"cks": cks, "grpc": f"127.0.0.1:{grpc}", "url": f"http://127.0.0.1:{gport}", "gateway": gw,
           "tokenizer": AutoTokenizer.from_pretrained(str(backbone))}
    gw.stop()
    triton.stop()


def _tokens(stack, texts=TEXTS):
    enc = stack["tokenizer"](texts, padding=True, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def _reference(ck, ids, mask) -> np.ndarray:
    model, _ = checkpoint.load(ck)
    with torch.no_grad():
        return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_the_backbone_tokenizer_is_its_own(stack):
    ids, mask = _tokens(stack)
    assert ids.max() < 200 and (ids[:, 0] == stack["tokenizer"].cls_token_id).all()
    assert mask.sum(1).tolist() != [mask.shape[1]] * len(TEXTS)  # a padded batch of mixed lengths
    gw_tok = stack["gateway"].app.state.gateway.tokenizer()
    assert gw_tok.get_vocab() == stack["tokenizer"].get_vocab()


def test_one_grpc_request_mixing_the_family_adapters_equals_pytorch(stack):
    ids, mask = _tokens(stack)
    names = [ADAPTERS[r % len(ADAPTERS)] for r in range(len(ids))]  # a different adapter on (almost) every row
    client = grpcclient.InferenceServerClient(stack["grpc"])
    res = client.infer("hpeft", hpeft_inputs(grpcclient, ids, mask, names, "INT64"))
    logits, emb = res.as_numpy("logits"), res.as_numpy("embeddings")
    for r, n in enumerate(names):
        ref = _reference(stack["cks"][n], ids[r:r + 1], mask[r:r + 1])[0]
        got = emb[r] if MANIFEST[n].get("task") == "embedding" else logits[r, :len(ref)]
        assert np.abs(got - ref).max() <= TOL, n


@pytest.mark.parametrize("adapter", [a for a in ADAPTERS if MANIFEST[a].get("task") != "embedding"])
def test_gateway_predict_tokenizes_with_the_backbone_tokenizer(stack, adapter):
    out = _post(f"{stack['url']}/v1/predict", {"adapter": adapter, "inputs": TEXTS})
    got = np.array([o["logits"] for o in out["outputs"]], np.float32)
    ref = _reference(stack["cks"][adapter], *_tokens(stack))
    assert got.shape == ref.shape and np.abs(got - ref).max() <= TOL
    assert [o["label"] for o in out["outputs"]] == [f"label{int(r.argmax())}" for r in ref]


def test_gateway_embeddings_of_the_family_embedder(stack):
    out = _post(f"{stack['url']}/v1/embeddings", {"model": "peft-lora-fe-deberta", "input": TEXTS})
    got = np.array([d["embedding"] for d in out["data"]], np.float32)
    ref = _reference(stack["cks"]["peft-lora-fe-deberta"], *_tokens(stack))
    assert got.shape == ref.shape and np.abs(got - ref).max() <= TOL
