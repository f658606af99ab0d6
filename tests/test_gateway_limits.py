"""What the gateway bounds, over real HTTP (uvicorn), with no Triton behind it (nothing here may reach it):
request bodies on the stream, for every route (a 40 MiB chunked body is refused at its limit, and the
gateway's memory grows by far less than the body), texts that are not valid Unicode, unexpected errors,
the caches and metric labels that client input could grow, refusals on the OpenAI routes in OpenAI's error
shape, and the lifespan that opens and closes the Triton client."""

from __future__ import annotations

import json
import select
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

from exporters.export import export_checkpoint
from hpeft_serve.gateway import Gateway, GatewayThread, Settings
from hpeft_serve.serving.client import free_ports
from hpeft_serve.serving.deploy import deploy

from .test_export import _make_ckpt

TOKEN = "limits-token"
MIB = 2 ** 20


@pytest.fixture(scope="module")
def gw(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("limits")
    export_checkpoint(_make_ckpt(tiny_bert, "unipelt", root / "ck" / "uni", seed=0), root / "export", "onnx",
                      log=lambda *_: None)
    deploy(root / "export", root / "repo", log=lambda *_: None)
    dead, port = free_ports(2)  # nothing listens on `dead`: a request that got that far answers 503
    settings = Settings(repo=str(root / "repo"), triton=f"127.0.0.1:{dead}", admin_token=TOKEN, max_upload_mb=1,
                        max_inputs=8, max_chars=2000)
    thread = GatewayThread(settings, "127.0.0.1", port).start()
    yield {"port": port, "url": f"http://127.0.0.1:{port}", "thread": thread, "root": root, "settings": settings}
    thread.stop()


def _call(url, method="GET", body=None, raw=None, token=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _chunked(port: int, method: str, path: str, total: int, headers: dict | None = None,
             declared: int | None = None) -> tuple[bytes, int]:
    """Send up to `total` bytes as a chunked body (or, with `declared`, only headers with that Content-Length),
    stopping when the server answers, as any HTTP client does; (the response, the bytes sent)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = {"host": "x", "content-type": "application/json"} | (headers or {})
    head |= {"content-length": str(declared)} if declared is not None else {"transfer-encoding": "chunked"}
    s.sendall((f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode())
    piece = b'{"adapter": "uni", "inputs": ["' + b"a" * (65536 - 31)
    sent = 0
    try:
        while declared is None and sent < total and not select.select([s], [], [], 0)[0]:
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        if declared is None and sent >= total:
            s.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed: its answer is read below
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:  # the unread rest of the body resets the connection after the answer
        pass
    s.close()
    return data, sent


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM), where Linux allows it (the gateway runs in this process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _metrics(gw) -> str:
    return _call(f"{gw['url']}/metrics")[1]


@pytest.mark.parametrize("method,path,auth", [("POST", "/v1/predict", False), ("PUT", "/v1/adapters/big", True),
                                              ("GET", "/v1/adapters", False)])
def test_a_40mib_chunked_body_is_refused_at_its_limit_never_read_whole(gw, method, path, auth):
    limit = gw["settings"].upload_limit if method == "PUT" else gw["settings"].json_limit
    before = _metrics(gw)
    peak = _reset_peak()
    rss0 = _rss("VmRSS")
    response, sent = _chunked(gw["port"], method, path, 40 * MIB,
                              {"authorization": f"Bearer {TOKEN}"} if auth else None)
    growth = _rss("VmHWM") - rss0
    assert sent < 40 * MIB and b"connection: close" in response.lower()  # answered before the body was through
    if method == "GET":  # a route that reads no body answers, and the body it ignored is not read either
        assert _status(response) == 200, response[:300]
    else:
        assert _status(response) == 413, response[:300]
        body = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert f"{limit / MIB:.2f} MiB" in body["error"] and path in body["error"]
    if peak:  # a body read whole costs its size and more (40 MiB chunked predict: +107 MiB before the limits)
        assert growth < limit + 8 * MIB, growth / MIB
    after = _metrics(gw)  # no handler ran: only the refusal is counted
    if method == "POST":
        assert _count(after, 'hpeft_gateway_requests_total{adapter="_unknown",code="413"}') == \
            _count(before, 'hpeft_gateway_requests_total{adapter="_unknown",code="413"}') + 1
    if method == "PUT":
        assert _count(after, 'hpeft_gateway_adapter_writes_total{code="413",op="put"}') == \
            _count(before, 'hpeft_gateway_adapter_writes_total{code="413",op="put"}') + 1
        assert not (gw["root"] / "repo" / "hpeft" / "1" / "export" / "packs" / "big.json").exists()


def _count(metrics: str, series: str) -> float:
    lines = [line for line in metrics.splitlines() if line.startswith(series + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


@pytest.mark.parametrize("method,path", [("POST", "/v1/predict"), ("PUT", "/v1/adapters/big"), ("GET", "/healthz"),
                                         ("DELETE", "/v1/adapters/uni"), ("POST", "/nowhere")])
def test_a_declared_oversized_body_is_refused_before_it_is_sent(gw, method, path):
    limit = gw["settings"].upload_limit if method == "PUT" else gw["settings"].json_limit
    response, _ = _chunked(gw["port"], method, path, 0, {"authorization": f"Bearer {TOKEN}"}, declared=limit + 1)
    assert _status(response) == 413 and b"connection: close" in response.lower(), response[:300]


def test_openai_routes_answer_refusals_in_openai_error_shape(gw):
    """/v1/embeddings: a body over its limit is a 413, Triton away a 503, each in OpenAI's error body."""
    response, _ = _chunked(gw["port"], "POST", "/v1/embeddings", 0, declared=gw["settings"].json_limit + 1)
    error = json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]
    assert _status(response) == 413 and error["type"] == "invalid_request_error" and "MiB" in error["message"]
    assert 'hpeft_gateway_embedding_requests_total{code="413",model="_unknown"}' in _metrics(gw)
    code, out = _call(f"{gw['url']}/v1/embeddings", "POST", {"model": "uni", "input": ["x"]})
    error = json.loads(out)["error"]
    assert code == 503 and error["type"] == "server_error" and "Triton" in error["message"], out


def test_a_valid_request_at_its_limits_passes_the_body_limit(gw):
    s = gw["settings"]
    body = json.dumps({"adapter": "uni", "inputs": ["\u00e9\u4e2d" * (s.max_chars // 2)] * s.max_inputs}).encode()
    assert len(body) > s.max_inputs * s.max_chars * 6  # every character a 6-byte escape
    code, out = _call(f"{gw['url']}/v1/predict", "POST", raw=body)
    assert code == 503 and "Triton" in json.loads(out)["error"], out  # it got as far as calling Triton


@pytest.mark.parametrize("inputs,index", [(["\ud800"], 0), (["ok", "a \udfff b"], 1), (["x", "y", "\udc00\ud800"], 2),
                                          (["fine", "\ud83d"], 1)])
def test_a_lone_surrogate_is_a_400_naming_the_input(gw, inputs, index):
    code, out = _call(f"{gw['url']}/v1/predict", "POST", {"adapter": "uni", "inputs": inputs})
    assert code == 400, out
    error = json.loads(out)["error"]
    assert f"input {index} " in error and "surrogate" in error


def test_surrogates_elsewhere_are_clear_errors_and_valid_pairs_pass(gw):
    url = f"{gw['url']}/v1/predict"
    code, out = _call(url, "POST", {"adapter": "uni", "inputs": ["\ud83d\ude00 a smile"]})  # a valid pair
    assert code == 503, out  # valid text: it got as far as calling Triton
    for body in ({"adapter": "\ud800", "inputs": ["x"]}, {"adapter": "uni", "inputs": "\ud800"},
                 {"adapter": "uni", "inputs": [["\ud800"]]}):
        code, out = _call(url, "POST", body)
        assert code in (404, 422) and json.loads(out), (body, code, out)  # quoted back as valid JSON
    code, out = _call(url, "POST", raw=b'{"adapter": "uni", "inputs": ["\xff\xfe"]}')  # not UTF-8 at all
    assert 400 <= code < 500 and json.loads(out), out


def test_an_unexpected_error_is_a_short_500_without_a_traceback(gw):
    gateway = gw["thread"].app.state.gateway
    real = gateway.store.names
    gateway.store.names = lambda: [][0]  # a fault inside the gateway (its store listing raises)
    try:
        code, out = _call(f"{gw['url']}/v1/adapters")
    finally:
        gateway.store.names = real
    assert code == 500 and json.loads(out) == {"error": "internal error in the gateway (IndexError); it is logged"}
    assert _call(f"{gw['url']}/v1/adapters")[0] == 200


def test_the_label_cache_stays_bounded_whatever_names_clients_send(gw, tmp_path, monkeypatch):
    from hpeft_serve import gateway
    assert gateway.LABEL_CACHE == 4096
    size = 64  # the same cache, smaller, so that a few hundred names overflow it many times
    monkeypatch.setattr(gateway.service, "LABEL_CACHE", size)
    store = tmp_path / "store"
    store.mkdir()
    rng = np.random.default_rng(0)
    names = [f"n{rng.integers(1 << 40):x}-{i}" for i in range(10 * size)]
    for i, n in enumerate(names):
        (store / f"{n}.json").write_text(json.dumps({"sha256": f"{i:064x}", "labels": [f"l{i}"]}))
    g = Gateway(Settings(repo=gw["settings"].repo, store=str(store)))
    for i, n in enumerate(names):
        assert g.labels(n, f"{i:064x}"[:16]) == (f"l{i}",)
        assert g.labels(f"x{n}", "0" * 16) == ()  # unknown names are never cached
        assert len(g._labels) <= size
    assert len(g._labels) == size
    assert g.answered(names[-1]) and not g.answered(names[0])  # the least recently answered went first
    (store / f"{names[-1]}.json").unlink()
    assert g.labels(names[-1], f"{len(names) - 1:064x}"[:16]) == (f"l{len(names) - 1}",)  # a hit: no store read


def test_metrics_name_only_adapters_that_answered(gw):
    rng = np.random.default_rng(1)
    names = [f"r{rng.integers(1 << 40):x}" for _ in range(40)]
    for n in names:  # valid names, each failing (no Triton): none becomes a metric series of its own
        assert _call(f"{gw['url']}/v1/predict", "POST", {"adapter": n, "inputs": ["x"]})[0] == 503
    text = _metrics(gw)
    assert not any(n in text for n in names)
    assert _count(text, 'hpeft_gateway_requests_total{adapter="_other",code="503"}') >= len(names)


def test_the_lifespan_opens_and_closes_the_triton_client(gw):
    """create_app builds the Gateway (no Triton client yet); uvicorn's lifespan opens it at start and closes
    it at shutdown."""
    port = free_ports(1)[0]
    thread = GatewayThread(gw["settings"], "127.0.0.1", port)
    gateway = thread.app.state.gateway
    assert gateway._client is None
    thread.start()
    try:
        assert gateway._client is not None
        assert _call(f"http://127.0.0.1:{port}/livez")[0] == 200
    finally:
        thread.stop()
    assert gateway._client is None and not thread.thread.is_alive()


def test_each_resource_has_its_router_and_create_app_includes_them(gw):
    """The package layout: one router per resource (predict, embeddings, models and adapters, health), each
    route's endpoint defined in its router's module; create_app(settings) includes them all, nothing else."""
    from fastapi.routing import APIRoute
    from hpeft_serve.gateway import create_app
    from hpeft_serve.gateway.routers import embeddings, health, models, predict
    want = {"/v1/predict": predict, "/v1/embeddings": embeddings, "/v1/models": models,
            "/v1/models/{model_id}": models, "/v1/adapters": models, "/v1/adapters/{name}": models,
            "/healthz": health, "/livez": health, "/metrics": health}
    for module in (predict, embeddings, models, health):
        routes = [r for r in module.router.routes if isinstance(r, APIRoute)]
        assert {r.path for r in routes} == {p for p, m in want.items() if m is module}, module.__name__
        assert all(r.endpoint.__module__ == module.__name__ for r in routes), module.__name__
    for app in (gw["thread"].app, create_app(gw["settings"])):
        assert set(app.openapi()["paths"]) == set(want)
    assert {p for p in json.loads(_call(f"{gw['url']}/openapi.json")[1])["paths"]} == set(want)
