"""The OpenAI-compatible routes (POST /v1/embeddings, GET /v1/models) through the official `openai` client,
unchanged but for base_url and an api_key (the gateway ignores it for reads), over real HTTP (uvicorn) in
front of the real tritonserver: embeddings of an embedding adapter and of the plain backbone equal the
PyTorch forward within 1e-5 (float and base64, texts and token ids, padded batches of mixed lengths); every
bad input is an OpenAI-style 4xx that the client raises as its own exception class and that changes nothing
served; a classifier asked for embeddings, or an embedding adapter asked for /v1/predict, names the route
to call instead."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F

from exporters.export import export_checkpoint
from hpeft_serve import checkpoint
from hpeft_serve.gateway import GatewayThread, Settings
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig, pool
from hpeft_serve.serving.client import free_ports
from hpeft_serve.serving.deploy import deploy
from hpeft_serve.serving.triton import TritonServer
from hpeft_serve.training import build_model

from .test_embed_export import make_embed_ckpt
from .test_export import _make_ckpt, _reference

TOL = 1e-5
TOKEN = "openai-admin-token"
TEXTS = ["a wonderful, moving film", "dull and far too long, with actors who seem bored by their own lines", "ok"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("openai")
    cks = {"emb": make_embed_ckpt(tiny_bert, "unipelt", root / "ck" / "emb", seed=3),
           "clf": _make_ckpt(tiny_bert, "lora", root / "ck" / "clf", seed=4)}
    for ck in cks.values():
        export_checkpoint(ck, root / "export", "onnx", log=lambda *_: None)
    repo = root / "repo"
    deploy(root / "export", repo, log=lambda *_: None)
    http, grpc, metrics, gport = free_ports(4)
    triton = TritonServer(repo, http, grpc, metrics, work=root / "work").start()
    settings = Settings(repo=str(repo), triton=f"127.0.0.1:{grpc}", triton_metrics=f"http://127.0.0.1:{metrics}/metrics",
                        admin_token=TOKEN, max_inputs=8, max_chars=2000)
    gw = GatewayThread(settings, "127.0.0.1", gport).start()
    url = f"http://127.0.0.1:{gport}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-ignored-by-the-gateway")
    yield {"url": url, "client": client, "cks": cks, "gateway": gw.app.state.gateway, "backbone": tiny_bert,
           "repo": repo}
    gw.stop()
    triton.stop()


def _tokens(gateway, texts):
    return gateway.tokenize(texts, None)


def _plain(stack, ids, mask):
    """The plain backbone's embedding (no adapter), pooled and normalised as backbone.json says."""
    info = stack["gateway"].info.get("embedding") or {}
    pooling, normalize = info.get("pooling", "mean"), info.get("normalize", False)
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
    with torch.no_grad():
        x = pool(stack["backbone"].build_encoder()(ids, mask), mask, pooling)
        return (F.normalize(x, p=2.0, dim=-1) if normalize else x).numpy()


def _vectors(response) -> np.ndarray:
    assert response.object == "list" and [d.index for d in response.data] == list(range(len(response.data)))
    assert all(d.object == "embedding" for d in response.data)
    return np.array([d.embedding for d in response.data], np.float32)


def _post(url, body, raw=None):
    req = urllib.request.Request(url, raw if raw is not None else json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_adapter_embeddings_equal_the_pytorch_forward(stack):
    client, ck = stack["client"], stack["cks"]["emb"]
    ids, mask = _tokens(stack["gateway"], TEXTS)
    assert mask.min() == 0  # a padded batch of mixed lengths
    ref = _reference(ck, (ids, mask))
    for fmt in ("float", None):  # None: the client asks for base64 and decodes it itself
        extra = {"encoding_format": fmt} if fmt else {}
        out = client.embeddings.create(model="emb", input=TEXTS, **extra)
        got = _vectors(out)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= TOL, fmt
        assert out.model == "emb"
        assert out.usage.prompt_tokens == out.usage.total_tokens == int(mask.sum())
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)  # the adapter's head normalises
    one = _vectors(client.embeddings.create(model="emb", input=TEXTS[1], encoding_format="float"))
    assert one.shape == (1, ref.shape[1]) and np.abs(one[0] - ref[1]).max() <= TOL  # a string alone
    metrics = urllib.request.urlopen(f"{stack['url']}/metrics", timeout=30).read().decode()
    assert 'hpeft_gateway_embedding_requests_total{code="200",model="emb"} 3.0' in metrics
    assert 'hpeft_gateway_embedding_inputs_total{model="emb"} 7.0' in metrics


def test_backbone_embeddings_in_base64_equal_the_plain_encoder(stack):
    client, gateway = stack["client"], stack["gateway"]
    assert gateway.model_id == "tiny-bert"
    out = client.embeddings.create(model=gateway.model_id, input=TEXTS, encoding_format="base64")
    got = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in out.data])  # little-endian float32
    ids, mask = _tokens(gateway, TEXTS)
    ref = _plain(stack, ids, mask)
    assert got.shape == ref.shape == (3, stack["backbone"].config.hidden_size)
    assert np.abs(got - ref).max() <= TOL
    adapted = _vectors(client.embeddings.create(model="emb", input=TEXTS, encoding_format="float"))
    assert np.abs(adapted - ref).max() > 1e-3  # the adapter changes the embedding


def test_token_ids_embed_as_their_text_does(stack):
    client, gateway = stack["client"], stack["gateway"]
    ids, mask = _tokens(gateway, TEXTS)
    lists = [row[:int(m.sum())].tolist() for row, m in zip(ids, mask)]  # unpadded, mixed lengths
    from_text = _vectors(client.embeddings.create(model="emb", input=TEXTS, encoding_format="float"))
    from_ids = _vectors(client.embeddings.create(model="emb", input=lists, encoding_format="float"))
    assert np.abs(from_ids - from_text).max() <= TOL
    single = _vectors(client.embeddings.create(model="emb", input=lists[1], encoding_format="float"))
    assert np.abs(single[0] - from_text[1]).max() <= TOL
    code, out = _post(f"{stack['url']}/v1/embeddings", {"model": "tiny-bert", "input": lists, "user": "u-1"})
    assert code == 200 and out["usage"] == {"prompt_tokens": int(mask.sum()), "total_tokens": int(mask.sum())}
    assert np.abs(np.array([d["embedding"] for d in out["data"]], np.float32) - _plain(stack, ids, mask)).max() <= TOL


def test_models_are_listed_the_openai_way(stack):
    client = stack["client"]
    models = list(client.models.list())
    assert [m.id for m in models][0] == "tiny-bert" and {"emb", "clf"} <= {m.id for m in models}
    assert all(m.object == "model" and m.owned_by == "hpeft" and isinstance(m.created, int) for m in models)
    assert client.models.retrieve("emb").id == "emb"
    assert client.models.retrieve("tiny-bert").id == "tiny-bert"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found" and "nope" in e.value.body["message"]
    code, spec = 200, json.loads(urllib.request.urlopen(f"{stack['url']}/openapi.json", timeout=30).read())
    assert {"/v1/embeddings", "/v1/models", "/v1/models/{model_id}", "/v1/predict"} <= set(spec["paths"])


# (model, input, other arguments) -> the client's exception class and a word of the message
BAD = {
    "empty string": ("emb", "", {}, openai.BadRequestError, "empty string"),
    "empty list": ("emb", [], {}, openai.BadRequestError, "input is empty"),
    "empty token list": ("emb", [[101, 102], []], {}, openai.BadRequestError, "input 1 is an empty list"),
    "too many inputs": ("emb", ["x"] * 9, {}, openai.BadRequestError, "at most 8"),
    "unknown model": ("nope", ["x"], {}, openai.NotFoundError, "does not exist"),
    "model path": ("../etc/passwd", ["x"], {}, openai.NotFoundError, "does not exist"),
    "token id past the vocabulary": ("emb", [[101, 30522, 102]], {}, openai.BadRequestError, "out of range"),
    "negative token id": ("tiny-bert", [5, -1], {}, openai.BadRequestError, "token id -1 at position 1"),
    "too many characters": ("emb", ["x" * 2001], {}, openai.BadRequestError, "2001 characters"),
    "too many tokens": ("emb", ["a " * 600], {}, openai.BadRequestError, "tokens; this model takes at most 512"),
    "too many token ids": ("emb", [[101] * 513], {}, openai.BadRequestError, "at most 512"),
    "mixed input": ("emb", ["a", 5], {}, openai.BadRequestError, "input[1]"),
    "float token ids": ("emb", [[101, 1.5]], {}, openai.BadRequestError, "input"),
    "dimensions": ("emb", ["x"], {"dimensions": 8}, openai.BadRequestError, "dimensions is not supported"),
    "encoding format": ("emb", ["x"], {"encoding_format": "hex"}, openai.BadRequestError, "encoding_format"),
    "a classifier": ("clf", ["x"], {}, openai.BadRequestError, "POST /v1/predict"),
}


def _served(stack):
    client = stack["client"]
    listing = sorted((m.id, m.created) for m in client.models.list())
    emb = _vectors(client.embeddings.create(model="emb", input=TEXTS, encoding_format="float"))
    code, clf = _post(f"{stack['url']}/v1/predict", {"adapter": "clf", "inputs": TEXTS})
    assert code == 200
    return listing, emb.tobytes(), [o["logits"] for o in clf["outputs"]]


def test_bad_inputs_are_openai_4xx_and_change_nothing(stack):
    client = stack["client"]
    before = _served(stack)
    for case, (model, value, extra, error, word) in BAD.items():
        with pytest.raises(error) as e:
            client.embeddings.create(model=model, input=value, **extra)
        body = e.value.body
        assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error", case
        assert word in body["message"] and len(body["message"]) < 400, (case, body)
    assert _served(stack) == before


def test_raw_requests_get_openai_error_bodies(stack):
    url = stack["url"]
    before = _served(stack)
    for body, status, word in [({"model": "emb", "input": ["ok", "a \ud800 b"]}, 400, "input 1 is not valid Unicode"),
                               ({"input": ["x"]}, 400, "model"), ({"model": "emb"}, 400, "input"),
                               ({"model": "emb", "input": {"a": 1}}, 400, "not dict")]:
        code, out = _post(f"{url}/v1/embeddings", body)
        assert code == status and out["error"]["type"] == "invalid_request_error", (body, code, out)
        assert word in out["error"]["message"], (body, out)
    code, out = _post(f"{url}/v1/embeddings", None, raw=b'{"model": "emb", "input": [')
    assert code == 400 and "not valid JSON" in out["error"]["message"]
    code, out = _post(f"{url}/v1/predict", {"adapter": "emb", "inputs": ["x"]})  # the gateway's own shape there
    assert code == 400 and "POST /v1/embeddings" in out["error"], out
    req = urllib.request.Request(f"{url}/v1/adapters/tiny-bert", b"x", method="PUT",
                                 headers={"authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as e:  # the backbone's model id is no adapter name
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "backbone's model id" in json.loads(e.value.read())["error"]
    assert _served(stack) == before


def test_an_uploaded_embedding_adapter_is_served_without_restart(stack):
    client, url = stack["client"], stack["url"]
    pack = (stack["repo"] / "hpeft" / "1" / "export" / "packs" / "emb.safetensors").read_bytes()
    req = urllib.request.Request(f"{url}/v1/adapters/emb-up", pack, method="PUT",
                                 headers={"authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 201 and json.loads(r.read())["task"] == "embedding"
    try:
        ids, mask = _tokens(stack["gateway"], TEXTS)
        got = _vectors(client.embeddings.create(model="emb-up", input=TEXTS, encoding_format="float"))
        assert np.abs(got - _reference(stack["cks"]["emb"], (ids, mask))).max() <= TOL
        assert "emb-up" in {m.id for m in client.models.list()}
        listing = json.loads(urllib.request.urlopen(f"{url}/v1/adapters", timeout=30).read())["adapters"]
        assert {a["name"]: a["task"] for a in listing}["emb-up"] == "embedding"
    finally:
        req = urllib.request.Request(f"{url}/v1/adapters/emb-up", method="DELETE",
                                     headers={"authorization": f"Bearer {TOKEN}"})
        assert urllib.request.urlopen(req, timeout=30).status == 200
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="emb-up", input=TEXTS)


def test_concurrent_embeddings_and_predictions_are_each_exact(stack):
    """Embedding and classifier requests at once (Triton may batch their rows into one forward): every
    answer equals its own PyTorch forward."""
    from concurrent.futures import ThreadPoolExecutor
    client, gateway = stack["client"], stack["gateway"]
    ids, mask = _tokens(gateway, TEXTS)
    want = {"emb": _reference(stack["cks"]["emb"], (ids, mask)), "tiny-bert": _plain(stack, ids, mask),
            "clf": _reference(stack["cks"]["clf"], (ids, mask))}

    def call(i):
        name = ("emb", "tiny-bert", "clf")[i % 3]
        if name == "clf":
            code, out = _post(f"{stack['url']}/v1/predict", {"adapter": "clf", "inputs": TEXTS})
            assert code == 200, out
            return name, np.array([o["logits"] for o in out["outputs"]], np.float32)
        return name, _vectors(client.embeddings.create(model=name, input=TEXTS, encoding_format="float"))

    with ThreadPoolExecutor(6) as pool:
        for name, got in pool.map(call, range(18)):
            assert got.shape == want[name].shape and np.abs(got - want[name]).max() <= TOL, name


def _readme_curls(section: str = "### Embeddings, OpenAI-compatible") -> list[list[str]]:
    """The curl commands of the README's bash block in `section`, continuation lines joined, as argv lists."""
    import shlex
    from pathlib import Path
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text[text.index(section):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(cmd, comments=True) for cmd in block.replace("\\\n", " ").splitlines()
            if cmd.startswith("curl ")]


def test_the_readme_curl_commands_answer_as_the_readme_says(stack):
    """The README's curl examples, run with the real curl against this gateway (host and adapter name
    swapped for this stack's): the embeddings equal the PyTorch forward, the model list starts with the backbone."""
    import shutil
    import subprocess
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    host = stack["url"].removeprefix("http://")
    cmds = _readme_curls()
    assert [c[2].rsplit("/", 2)[-2:] for c in cmds] == [["v1", "embeddings"], ["v1", "models"]], cmds
    answers = []
    for argv in cmds:
        argv = [a.replace("localhost:8080", host) for a in argv]
        body = next((i for i, a in enumerate(argv) if a == "-d"), None)
        if body is not None:  # the README's adapter -> this stack's embedding adapter
            req = json.loads(argv[body + 1])
            argv[body + 1] = json.dumps(req | {"model": "emb"})
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        answers.append((req if body is not None else None, json.loads(out.stdout)))
    (req, emb), (_, models) = answers
    assert emb["object"] == "list" and emb["model"] == "emb" and [d["index"] for d in emb["data"]] == [0, 1]
    ids, mask = _tokens(stack["gateway"], req["input"])
    got = np.array([d["embedding"] for d in emb["data"]], np.float32)
    assert np.abs(got - _reference(stack["cks"]["emb"], (ids, mask))).max() <= TOL
    assert emb["usage"] == {"prompt_tokens": int(mask.sum()), "total_tokens": int(mask.sum())}
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-bert"
    assert models["data"][0]["object"] == "model"
