"""The REST gateway over real HTTP (uvicorn) in front of the real tritonserver, both started here:
answers equal the PyTorch forward of the adapter; uploads, replacements and deletions reach the running
model without a restart; every bad input of the matrix is a clear 4xx that changes nothing served;
Triton down is a 503 until it is back, a killed Python-backend stub is a 503 until the model reloads,
and no uploaded adapter is lost."""

from __future__ import annotations

import json
import os
import pickle
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from exporters.export import export_checkpoint
from hpeft_serve.gateway import GatewayThread, Settings
from hpeft_serve.serving.client import free_ports
from hpeft_serve.serving.deploy import deploy
from hpeft_serve.serving.triton import TritonServer

from .test_export import _make_ckpt, _reference

TOL = 1e-5
TOKEN = "test-admin-token"
TEXTS = ["a wonderful, moving film", "dull and far too long, with actors who seem bored by their own lines", "ok"]


def _call(url, method="GET", body=None, token=None, raw=None, content_type="application/json"):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", content_type)
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null") if "json" in r.headers.get("content-type", "") else r.read().decode()
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except json.JSONDecodeError:
            return e.code, text.decode()


def _message(payload) -> str:
    return json.dumps(payload)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_bert, tiny_roberta):
    root = tmp_path_factory.mktemp("gateway")
    cks = {"uni": _make_ckpt(tiny_bert, "unipelt", root / "ck" / "uni", seed=0),
           "comp": _make_ckpt(tiny_bert, "compacter", root / "ck" / "comp", labels=3, seed=1),
           "uni2": _make_ckpt(tiny_bert, "unipelt", root / "ck" / "uni2", seed=5),  # uploaded, not deployed
           "lora-rob": _make_ckpt(tiny_roberta, "lora", root / "ck" / "lora-rob", seed=2)}
    for n in ("uni", "comp"):
        export_checkpoint(cks[n], root / "export", "onnx", log=lambda *_: None)
    export_checkpoint(cks["uni2"], root / "upload", "onnx", log=lambda *_: None)
    export_checkpoint(cks["lora-rob"], root / "upload-rob", "onnx", log=lambda *_: None)
    repo = root / "repo"
    deploy(root / "export", repo, log=lambda *_: None)
    http, grpc, metrics, gport = free_ports(4)
    state = {"root": root, "repo": repo, "cks": cks, "ports": (http, grpc, metrics)}
    state["triton"] = TritonServer(repo, http, grpc, metrics, work=root / "work").start()
    settings = Settings(repo=str(repo), triton=f"127.0.0.1:{grpc}", triton_metrics=f"http://127.0.0.1:{metrics}/metrics",
                        admin_token=TOKEN, max_upload_mb=1, max_inputs=8, max_chars=2000)
    gw = GatewayThread(settings, "127.0.0.1", gport).start()
    state["url"], state["gateway"] = f"http://127.0.0.1:{gport}", gw
    yield state
    gw.stop()
    state["triton"].stop()


def _tokens(gateway, texts):
    enc = gateway.app.state.gateway.tokenizer()(texts, padding=True, truncation=True, max_length=512, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def _expect(stack, ck, texts=TEXTS):
    return _reference(ck, _tokens(stack["gateway"], texts))


def _predict(stack, adapter, texts=TEXTS):
    return _call(f"{stack['url']}/v1/predict", "POST", {"adapter": adapter, "inputs": texts})


def _check_answer(stack, adapter, ck, texts=TEXTS):
    code, out = _predict(stack, adapter, texts)
    assert code == 200, out
    ref = _expect(stack, ck, texts)
    got = np.array([o["logits"] for o in out["outputs"]], np.float32)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= TOL
    for o, r in zip(out["outputs"], ref):
        assert o["label"] == f"l{int(r.argmax())}"
        assert abs(sum(o["scores"]) - 1) < 1e-4
    return out


def test_predict_equals_the_pytorch_forward(stack):
    out = _check_answer(stack, "uni", stack["cks"]["uni"])
    assert out["adapter"] == "uni" and len(out["version"]) == 16 and out["latency_ms"] > 0
    _check_answer(stack, "comp", stack["cks"]["comp"])  # 3 labels, another method, same backbone graph


def test_long_inputs_are_truncated_and_flagged(stack):
    from hpeft_serve.gateway import Gateway
    gw = Gateway(Settings(repo=str(stack["repo"]), triton=stack["gateway"].app.state.gateway.s.triton, max_tokens=16))
    texts = ["short", "a long review that goes on and on " * 10]
    out = gw.predict("uni", texts)
    assert out["truncated"] == [False, True]
    enc = gw.tokenizer()(texts, padding=True, truncation=True, max_length=16, return_tensors="np")
    ref = _reference(stack["cks"]["uni"], (enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)))
    assert np.abs(np.array([o["logits"] for o in out["outputs"]], np.float32) - ref).max() <= TOL
    assert "truncated" not in gw.predict("uni", ["short"])


def test_adapters_list_health_metrics_and_docs(stack):
    _check_answer(stack, "uni", stack["cks"]["uni"])
    code, out = _call(f"{stack['url']}/v1/adapters")
    assert code == 200
    by = {a["name"]: a for a in out["adapters"]}
    assert {"uni", "comp"} <= set(by)
    assert by["uni"]["method"] == "unipelt" and by["comp"]["labels"] == ["l0", "l1", "l2"]
    assert by["uni"]["size"] > 0 and len(by["uni"]["version"]) == 16
    assert by["uni"]["loaded"] is True  # resident in Triton's bank, read from Triton's metrics
    assert _call(f"{stack['url']}/healthz") == (200, {"status": "ok", "gateway": "ok", "triton": "ready"})
    assert _call(f"{stack['url']}/livez")[0] == 200
    code, text = _call(f"{stack['url']}/metrics")
    assert code == 200
    assert 'hpeft_gateway_requests_total{adapter="uni",code="200"}' in text
    assert 'hpeft_gateway_request_seconds_count{adapter="uni"}' in text
    code, spec = _call(f"{stack['url']}/openapi.json")
    assert code == 200 and {"/v1/predict", "/v1/adapters", "/v1/adapters/{name}", "/healthz", "/metrics"} <= set(spec["paths"])
    assert _call(f"{stack['url']}/docs")[0] == 200


def test_upload_replace_delete_without_restart(stack):
    url, pack = stack["url"], stack["root"] / "upload" / "packs" / "uni2.safetensors"
    code, out = _call(f"{url}/v1/adapters/fresh", "PUT", raw=pack.read_bytes(), token=TOKEN,
                      content_type="application/octet-stream")
    assert code == 201 and out["replaced"] is False and out["method"] == "unipelt", out
    # preloaded in the background and its residency gauge published by the model's own thread: shown
    # loaded before any request has named it (no execute runs in between)
    t0 = time.monotonic()
    while not {a["name"]: a for a in _call(f"{url}/v1/adapters")[1]["adapters"]}.get("fresh", {}).get("loaded"):
        assert time.monotonic() - t0 < 30, "the uploaded adapter was never shown resident without a request"
        time.sleep(0.2)
    _check_answer(stack, "fresh", stack["cks"]["uni2"])
    # replace "fresh" with uni's pack: the next answer is uni's, and names uni's version
    uni = stack["repo"] / "hpeft" / "1" / "export" / "packs" / "uni.safetensors"
    code, out = _call(f"{url}/v1/adapters/fresh", "PUT", raw=uni.read_bytes(), token=TOKEN)
    assert code == 201 and out["replaced"] is True
    answer = _check_answer(stack, "fresh", stack["cks"]["uni"])
    assert answer["version"] == out["version"]
    assert _call(f"{url}/v1/adapters/fresh", "DELETE", token=TOKEN)[0] == 200
    code, out = _predict(stack, "fresh")
    assert code == 404 and "unknown adapter 'fresh'" in out["error"]
    assert _call(f"{url}/v1/adapters/fresh", "DELETE", token=TOKEN)[0] == 404


def _reheader(good: bytes, change) -> bytes:
    """The pack `good` with its safetensors header changed by `change(header)` (the tensor data kept)."""
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + good[8 + n:]


def _remeta(good: bytes, change) -> bytes:
    """The pack `good` with its embedded pack json changed by `change(meta)`."""
    def edit(header):
        meta = json.loads(header["__metadata__"]["hpeft_pack"])
        header["__metadata__"]["hpeft_pack"] = json.dumps(change(meta))
    return _reheader(good, edit)


def _no_labels(good: bytes) -> bytes:
    """A consistent pack with 0 outputs: C=0, no labels, the head's tensors with a 0-long label axis."""
    from safetensors.numpy import load, save
    from hpeft_serve.pack.layout import spec
    n = int.from_bytes(good[:8], "little")
    meta = json.loads(json.loads(good[8:8 + n])["__metadata__"]["hpeft_pack"])
    meta["sizes"], meta["labels"] = meta["sizes"] | {"C": 0}, []
    tensors = {k: t[(slice(None),) * list(spec()[k]).index("C") + (slice(0, 0),)] if "C" in spec()[k] else t
               for k, t in load(good).items()}
    return save(tensors, metadata={"format": "hpeft-pack", "hpeft_pack": json.dumps(meta)})


def _garbage(stack) -> dict:
    good = (stack["repo"] / "hpeft" / "1" / "export" / "packs" / "uni.safetensors").read_bytes()
    header_len = int.from_bytes(good[:8], "little")
    corrupt = bytearray(good)
    corrupt[8 + header_len + 100: 8 + header_len + 164] = b"\xff" * 64  # NaNs in the tensor data
    deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return {
        "pickle": pickle.dumps({"weights": [1.0, 2.0]}),
        "truncated": good[: len(good) // 2],
        "corrupt header": good[:8] + b"{not json" + good[17:],
        "non-finite": bytes(corrupt),
        "other backbone": (stack["root"] / "upload-rob" / "packs" / "lora-rob.safetensors").read_bytes(),
        "empty": b"",
        "deep header": len(deep).to_bytes(8, "little") + deep + good[8 + header_len:],
        "metadata list": _reheader(good, lambda h: h.update({"__metadata__": ["hpeft_pack"]})),
        "hpeft_pack list": _reheader(good, lambda h: h["__metadata__"].update({"hpeft_pack": "[1, 2]"})),
        "labels 5": _remeta(good, lambda m: m | {"labels": 5}),
        "backbone string": _remeta(good, lambda m: m | {"backbone": "minilm"}),
        "zero labels": _no_labels(good),
    }


# what each bad upload is answered: its status and a word of the message naming the problem
BAD_UPLOADS = {"pickle": (400, "not a safetensors file"), "truncated": (400, ""), "corrupt header": (400, "JSON"),
               "non-finite": (400, "non-finite"), "other backbone": (400, "backbone"), "empty": (400, "safetensors"),
               "deep header": (400, "nested too deeply"), "metadata list": (400, "__metadata__"),
               "hpeft_pack list": (400, "hpeft_pack"), "labels 5": (400, "labels"),
               "backbone string": (400, "backbone"), "zero labels": (400, "0 outputs")}


def _served_state(stack):
    _, listing = _call(f"{stack['url']}/v1/adapters")
    answers = {n: _predict(stack, n)[1]["outputs"] for n in ("uni", "comp")}
    return {a["name"]: (a["version"], a["size"]) for a in listing["adapters"]}, answers


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_uploads_are_4xx_and_change_nothing(stack, case):
    before = _served_state(stack)
    body = _garbage(stack)[case]
    status, word = BAD_UPLOADS[case]
    for name in ("uni", "newname"):  # neither a replacement nor a new adapter goes through
        code, out = _call(f"{stack['url']}/v1/adapters/{name}", "PUT", raw=body, token=TOKEN,
                          content_type="application/octet-stream")
        assert code == status and isinstance(out, dict) and word in out.get("error", ""), (case, code, out)
        assert "Traceback" not in out["error"] and len(out["error"]) < 400
    assert _served_state(stack) == before


def test_bad_requests_are_clear_4xx(stack):
    url = stack["url"]
    before = _served_state(stack)
    cases = [
        ({"adapter": "nope", "inputs": ["x"]}, 404, "unknown adapter"),
        ({"adapter": "../etc/passwd", "inputs": ["x"]}, 404, "unknown adapter"),
        ({"adapter": "uni", "inputs": []}, 422, "inputs"),
        ({"adapter": "uni", "inputs": "just a string"}, 422, "inputs"),
        ({"adapter": "uni", "inputs": [1, 2]}, 422, "inputs"),
        ({"adapter": 5, "inputs": ["x"]}, 422, "adapter"),
        ({"inputs": ["x"]}, 422, "adapter"),
        ({"adapter": "uni", "inputs": ["x"] * 9}, 413, "at most 8"),
        ({"adapter": "uni", "inputs": ["x" * 2001]}, 413, "characters"),
        ({"adapter": "uni", "inputs": ["ok", "a lone \ud800"]}, 400, "input 1 is not valid Unicode"),
    ]
    for body, code, word in cases:
        got, out = _call(f"{url}/v1/predict", "POST", body)
        assert got == code and word in _message(out), (body, got, out)
    got, out = _call(f"{url}/v1/predict", "POST", raw=b'{"adapter": "uni", "inputs": [', content_type="application/json")
    assert got == 422 and "json" in _message(out).lower()
    # writes: token, names, size
    pack = (stack["repo"] / "hpeft" / "1" / "export" / "packs" / "uni.safetensors").read_bytes()
    assert _call(f"{url}/v1/adapters/uni", "DELETE")[0] == 401
    assert _call(f"{url}/v1/adapters/uni", "DELETE", token="wrong")[0] == 403
    assert _call(f"{url}/v1/adapters/x", "PUT", raw=pack)[0] == 401
    for name in ("..%2Fevil", "..", ".hidden", "a%20b", "%2Fetc%2Fpasswd", "x" * 129):
        got, out = _call(f"{url}/v1/adapters/{name}", "PUT", raw=pack, token=TOKEN)
        assert 400 <= got < 500, (name, got, out)
    # bodies over their limit, declared or chunked, on every route: tests/test_gateway_limits.py
    assert not list(Path(stack["repo"]).rglob("*evil*"))
    assert _served_state(stack) == before


def _predict_with_headers(stack, adapter, texts=TEXTS):
    req = urllib.request.Request(f"{stack['url']}/v1/predict", json.dumps({"adapter": adapter, "inputs": texts}).encode(),
                                 {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def _drop(packs: Path, name: str, raw: bytes, meta: dict) -> None:
    """A pack put into the store directly (as an operator copying files would), bypassing the gateway."""
    (packs / f"{name}.safetensors").write_bytes(raw)
    (packs / f"{name}.json").write_text(json.dumps(meta | {"name": name}))


def test_each_code_of_the_model_has_its_status(stack):
    """The model's refusals, by their code (serving/codes.py), through the gateway: 404, 400, 503 +
    Retry-After, 422, 502, each with a message naming the problem and no tag; the served adapters answer."""
    import hashlib
    import shutil
    from hpeft_serve.gateway import Gateway, GatewayError
    packs = stack["repo"] / "hpeft" / "1" / "export" / "packs"
    before = _served_state(stack)
    good, meta = (packs / "uni.safetensors").read_bytes(), json.loads((packs / "uni.json").read_text())
    nan = _garbage(stack)["non-finite"]
    _drop(packs, "g-updating", good, meta | {"sha256": "0" * 64})  # its json names other tensors: being replaced
    _drop(packs, "g-invalid", nan, meta | {"sha256": hashlib.sha256(nan).hexdigest()})  # complete, but NaNs
    _drop(packs, "g-internal", good, meta)
    (packs / "g-internal.safetensors").unlink()
    (packs / "g-internal.safetensors").mkdir()  # files the store cannot read
    try:
        cases = {"nope": (404, "unknown adapter 'nope'"), "g-updating": (503, "being replaced; retry"),
                 "g-invalid": (422, "non-finite"), "g-internal": (502, "cannot be read")}
        for name, (status, words) in cases.items():
            code, out, headers = _predict_with_headers(stack, name)
            assert code == status and words in out["error"] and "[hpeft:" not in out["error"], (name, code, out)
            assert (headers.get("Retry-After") == "1") == (status == 503), (name, dict(headers))
        # invalid input: a sequence longer than the model takes (this gateway's own limit set above it)
        gw = Gateway(Settings(repo=str(stack["repo"]), triton=stack["gateway"].app.state.gateway.s.triton, max_tokens=600))
        with pytest.raises(GatewayError) as e:
            gw.predict("uni", ["word " * 600])
        assert e.value.status == 400 and "512" in e.value.message and "[hpeft:" not in e.value.message, e.value.message
    finally:
        for n in ("g-updating", "g-invalid", "g-internal"):
            (packs / f"{n}.json").unlink()
        (packs / "g-updating.safetensors").unlink()
        (packs / "g-invalid.safetensors").unlink()
        shutil.rmtree(packs / "g-internal.safetensors")
    assert _served_state(stack) == before


def test_model_not_loaded_is_503_until_it_is_loaded_again(stack):
    """Triton's own failure (no code): model hpeft unloaded by an operator (with the key) is 503 +
    Retry-After, told by its gRPC status; loaded again, the answers are right."""
    from hpeft_serve.serving.client import triton_key_headers
    client = stack["gateway"].app.state.gateway.client()
    key = triton_key_headers(stack["triton"].key)
    client.unload_model("hpeft", headers=key, client_timeout=60)
    try:
        code, out, headers = _predict_with_headers(stack, "uni")
        assert code == 503 and "not loaded" in out["error"] and headers.get("Retry-After") == "2", out
    finally:
        client.load_model("hpeft", headers=key, client_timeout=300)
    _until_ok(stack, "uni", stack["cks"]["uni"], seconds=60)


def _stub_pids(triton) -> list[int]:
    kids = Path(f"/proc/{triton.proc.pid}/task/{triton.proc.pid}/children").read_text().split()
    return [int(p) for p in kids if "triton_python_backend_stub" in Path(f"/proc/{p}/cmdline").read_text()]


def _until_ok(stack, adapter, ck, seconds=90):
    t0 = time.monotonic()
    codes = []
    while time.monotonic() - t0 < seconds:
        code, out = _predict(stack, adapter)
        codes.append(code)
        if code == 200:
            _check_answer(stack, adapter, ck)
            return codes
        assert code == 503, out  # never a wrong answer, never another error
        assert "retry" in out["error"]
        time.sleep(0.3)
    raise AssertionError(f"no answer within {seconds}s: {codes[-5:]}")


def test_killed_stub_is_503_then_served_again(stack):
    _check_answer(stack, "uni", stack["cks"]["uni"])
    pids = _stub_pids(stack["triton"])
    assert pids
    for p in pids:
        os.kill(p, signal.SIGKILL)
    time.sleep(0.5)
    code, out = _predict(stack, "uni")
    assert code == 503 and "stub" in out["error"], out
    codes = _until_ok(stack, "uni", stack["cks"]["uni"])
    assert _call(f"{stack['url']}/healthz")[0] == 200
    assert set(_stub_pids(stack["triton"])).isdisjoint(pids), codes


def test_triton_down_is_503_and_recovers_with_uploads_kept(stack):
    url = stack["url"]
    pack = stack["root"] / "upload" / "packs" / "uni2.safetensors"
    assert _call(f"{url}/v1/adapters/kept", "PUT", raw=pack.read_bytes(), token=TOKEN)[0] == 201
    _check_answer(stack, "kept", stack["cks"]["uni2"])
    stack["triton"].stop()
    code, out = _call(f"{url}/healthz")
    assert code == 503 and "not reachable" in out["triton"], out
    code, out = _predict(stack, "uni")
    assert code == 503 and "Triton" in out["error"], out
    http, grpc, metrics = stack["ports"]
    stack["triton"] = TritonServer(stack["repo"], http, grpc, metrics, work=stack["root"] / "work2").start()
    _until_ok(stack, "kept", stack["cks"]["uni2"], seconds=30)  # the upload survived the restart
    _check_answer(stack, "uni", stack["cks"]["uni"])
    assert _call(f"{url}/healthz")[0] == 200


def test_hpeft_serve_restarts_a_dead_tritonserver(stack, tmp_path):
    """`hpeft serve` (the CLI, as a user runs it): tritonserver killed -> restarted; the gateway answers 503
    meanwhile, then the right answers; SIGTERM stops both."""
    import subprocess
    import sys
    http, grpc, metrics, gport = free_ports(4)
    env = dict(os.environ, HPEFT_ADMIN_TOKEN=TOKEN)
    hpeft = Path(sys.executable).with_name("hpeft")
    proc = subprocess.Popen([str(hpeft), "serve", "--repo", str(stack["repo"]), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--gateway-port", str(gport)],
                            env=env, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    mine = dict(stack, url=f"http://127.0.0.1:{gport}")
    try:
        t0 = time.monotonic()
        while not (_port_open(gport) and _call(f"{mine['url']}/healthz")[0] == 200):
            assert proc.poll() is None and time.monotonic() - t0 < 120, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        _check_answer(mine, "uni", stack["cks"]["uni"])
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        triton = [int(p) for p in kids if "tritonserver" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(triton) == 1
        os.kill(triton[0], signal.SIGKILL)
        codes = _until_ok(mine, "uni", stack["cks"]["uni"], seconds=120)
        assert 503 in codes, codes  # the gateway said so while Triton was away
        assert "restarting it" in (tmp_path / "serve.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert not _port_open(gport) and not _port_open(grpc)


def _port_open(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
