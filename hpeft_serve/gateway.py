"""The REST gateway (FastAPI) in front of Triton: text in, labels out, adapters managed over HTTP.

    POST   /v1/predict          {"adapter": NAME, "inputs": [TEXT, ...]} -> label, scores, logits per input
    GET    /v1/adapters         name, method, size, version, labels, loaded (resident in Triton's bank)
    PUT    /v1/adapters/{name}  body: a pack's .safetensors (its header carries the pack json); bearer token
    DELETE /v1/adapters/{name}  bearer token
    GET    /healthz             200 when the gateway and Triton's model `hpeft` are ready, else 503
    GET    /livez               200 while the process runs
    GET    /metrics             Prometheus: requests, errors and latency per adapter
    GET    /docs                OpenAPI

Text is tokenized here and sent to Triton over gRPC, one row per input, each naming the adapter. Uploads
are validated against the served backbone and slot layout before a byte reaches the adapter store, and
written tensors-first, json-last, so the model picks the new version up on its next request (a request
sees the old or the new adapter, never a mix). Nothing here unpickles anything.

Statuses: a refusal of the model carries a code (serving/codes.py) that sets the status, and the client sees
the message without its tag: unknown adapter 404, invalid input 400, adapter being replaced 503 +
Retry-After, invalid pack 422, internal error 502. Triton's own failures (`_triton_failure`): a dead stub
(the model is reloaded), model not loaded, Triton unreachable or too slow: 503 + Retry-After; else 502.
The gateway's own: a text with a lone surrogate 400 naming the input, too many inputs or characters 413,
a bad upload 400 (409: the graph lacks its slot kinds), a malformed request 422, an unexpected error 500
with a short message (the server logs the traceback).

Limits: a body over its route's limit is 413 as soon as it passes it, declared or chunked (gateway_limits):
PUT /v1/adapters/{name} HPEFT_MAX_UPLOAD_MB, any other route MAX_INPUTS x (6 x MAX_CHARS + 4) + 64 KiB
(a valid predict request at its limits, every character a 6-byte JSON escape). Caches keyed by what clients
send are bounded (LABEL_CACHE adapter names, least recently answered out first).

Settings come from arguments or the environment: HPEFT_REPO, HPEFT_TRITON_GRPC, HPEFT_TRITON_METRICS,
HPEFT_ADAPTER_STORE, HPEFT_ADMIN_TOKEN, HPEFT_TRITON_KEY, HPEFT_MAX_UPLOAD_MB, HPEFT_MAX_INPUTS, HPEFT_MAX_CHARS,
HPEFT_MAX_TOKENS.
"""

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from .errors import CheckpointError, HpeftError
from .names import NAME, check_name
from .serving.client import TRITON_KEY_ENV, hpeft_inputs, triton_key_headers
from .serving.codes import Code, parse
from .pack.check import MissingSlots, check_pack, check_slots, embedded_meta, safetensors_header
from .pack.layout import Layout
from .pack.store import PackStore
from .gateway_limits import BodyLimit, BoundedCache

MODEL = "hpeft"
LABEL_CACHE = 4096  # adapter names whose labels are kept (least recently answered out first)
ENV = {"repo": "HPEFT_REPO", "triton": "HPEFT_TRITON_GRPC", "triton_metrics": "HPEFT_TRITON_METRICS",
       "store": "HPEFT_ADAPTER_STORE", "admin_token": "HPEFT_ADMIN_TOKEN", "triton_key": TRITON_KEY_ENV, "max_upload_mb": "HPEFT_MAX_UPLOAD_MB",
       "max_inputs": "HPEFT_MAX_INPUTS", "max_chars": "HPEFT_MAX_CHARS", "max_tokens": "HPEFT_MAX_TOKENS"}


@dataclass
class Settings:
    repo: str = "model_repository"  # a folder or an fsspec URL (s3://bucket/model_repository)
    triton: str = "localhost:8001"  # gRPC HOST:PORT
    triton_metrics: str = ""  # http://HOST:PORT/metrics; default: Triton's host, port 8002
    store: str = ""  # the adapter store; default REPO/hpeft/1/export/packs
    admin_token: str = ""  # bearer token for PUT/DELETE; empty: writes are refused
    triton_key: str = ""  # the key of Triton's restricted APIs (model reload); default: its key file on this host
    max_upload_mb: float = 64.0
    max_inputs: int = 64
    max_chars: int = 20_000
    max_tokens: int = 512

    @classmethod
    def from_env(cls, **given) -> "Settings":
        values = {}
        for f in fields(cls):
            v = given.get(f.name)
            if v is None and os.environ.get(ENV[f.name]):
                v = os.environ[ENV[f.name]]
            if v is not None:
                values[f.name] = type(f.default)(v)
        return cls(**values)

    def __post_init__(self):
        if not self.triton_metrics:
            self.triton_metrics = f"http://{self.triton.rsplit(':', 1)[0]}:8002/metrics"

    @property
    def export(self) -> str:
        return f"{str(self.repo).rstrip('/')}/{MODEL}/1/export"

    @property
    def upload_limit(self) -> int:
        """Bytes of a PUT /v1/adapters/{name} body."""
        return int(self.max_upload_mb * 2 ** 20)

    @property
    def json_limit(self) -> int:
        """Bytes of any other body: a predict request at its limits, each character a 6-byte JSON escape."""
        return self.max_inputs * (6 * self.max_chars + 4) + 65536


class GatewayError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _read(location: str) -> bytes:
    if "://" in location:
        import fsspec
        with fsspec.open(location, "rb") as f:
            return f.read()
    return Path(location).read_bytes()


class Gateway:
    """What the endpoints do, apart from HTTP: tokenize, call Triton, validate and store packs."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.info = self._backbone_info()
        self.store = PackStore(settings.store or f"{settings.export}/packs", self.info)
        self._tokenizer, self._tok_lock = None, threading.Lock()
        self._labels = BoundedCache(LABEL_CACHE)  # adapter name -> (version, labels) of its last answer
        self._client = None
        self._recovering = threading.Lock()  # held while model hpeft reloads after its stub process died
        self.tokenizer()  # fail at start, not on the first request

    # ------------------------------------------------------------------ backbone, tokenizer, Triton
    def _backbone_info(self) -> dict:
        try:
            return json.loads(_read(f"{self.s.export}/backbone.json"))
        except (OSError, FileNotFoundError, json.JSONDecodeError) as e:
            raise HpeftError(f"no shared-backbone export in {self.s.repo} ({e}): deploy one with "
                             "`hpeft deploy EXPORT_DIR --repo REPO`") from None

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            from .assets import tokenizer_folder
            self._tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(self.info["backbone"]["name"])))
        return self._tokenizer

    def client(self):
        if self._client is None:
            import tritonclient.grpc as grpcclient
            # reconnect within a second once Triton is back (gRPC's default backoff grows to two minutes)
            args = [("grpc.max_send_message_length", 2 ** 31 - 1), ("grpc.max_receive_message_length", 2 ** 31 - 1),
                    ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 1000)]
            self._client = grpcclient.InferenceServerClient(self.s.triton, channel_args=args)
        return self._client

    def triton_state(self) -> str | None:
        """None when Triton and model hpeft are ready, else what is wrong."""
        if self._recovering.locked():
            return f"model {MODEL!r} is reloading after its Python-backend stub process died"
        try:
            c = self.client()
            if not c.is_server_ready(client_timeout=2):
                return f"Triton at {self.s.triton} is not ready"
            if not c.is_model_ready(MODEL, client_timeout=2):
                return f"model {MODEL!r} is not loaded in Triton at {self.s.triton}"
        except Exception as e:  # noqa: BLE001 - any transport failure means "not reachable"
            return f"Triton at {self.s.triton} is not reachable ({_short(_text(e))})"
        return None

    # ------------------------------------------------------------------ predict
    def labels(self, name: str, version: str) -> tuple:
        """The labels of the pack version that answered (read from the store once per version: no store
        round trip on the request path)."""
        hit = self._labels.get(name)
        if hit is not None and hit[0] == version:
            return hit[1]
        meta = self.store.meta(name)
        meta = meta if isinstance(meta, dict) else {}
        labels = tuple(meta.get("labels") or ())
        if str(meta.get("sha256", ""))[:16] == version:  # the store may already hold a newer version: keep that out
            self._labels.put(name, (version, labels))
        return labels

    def answered(self, name: str) -> bool:
        """Whether the adapter answered lately (names that may label metrics: bounded, and real adapters)."""
        return name in self._labels

    def check_texts(self, texts: list[str]) -> None:
        if len(texts) > self.s.max_inputs:
            raise GatewayError(413, f"{len(texts)} inputs in one request; at most {self.s.max_inputs}")
        for i, t in enumerate(texts):
            if len(t) > self.s.max_chars:
                raise GatewayError(413, f"input {i} has {len(t)} characters; at most {self.s.max_chars}")
            if not t.isascii():
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:  # JSON allows a lone "\ud800"; no tokenizer takes it
                    raise GatewayError(400, f"input {i} is not valid Unicode text: a lone surrogate "
                                            f"{t[e.start]!r} at character {e.start} (surrogates come in pairs)") from None

    def predict(self, adapter: str, texts: list[str]) -> dict:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException
        if not NAME.fullmatch(adapter):
            raise GatewayError(404, f"unknown adapter {adapter!r}: GET /v1/adapters lists the adapters")
        self.check_texts(texts)
        with self._tok_lock:  # a fast tokenizer is not safe to call from several threads at once
            enc = self.tokenizer()(texts, padding=True, truncation=True, max_length=self.s.max_tokens,
                                   return_tensors="np")
        inputs = hpeft_inputs(grpcclient, enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64),
                              [adapter] * len(texts))
        try:
            res = self.client().infer(MODEL, inputs, client_timeout=60, headers={"x-hpeft-adapter": adapter})
        except InferenceServerException as e:
            if _dead_stub(_text(e)):  # Triton does not restart a dead stub by itself: reload the model
                self.recover()
            raise _triton_error(e, adapter) from None
        logits, version = res.as_numpy("logits"), res.as_numpy("adapter_version").reshape(-1)[0].decode()
        labels = self.labels(adapter, version)
        out = []
        for row in logits:
            row = row[:len(labels)] if labels else row
            z = np.exp(row - row.max())
            k = int(row.argmax())
            out.append({"label": labels[k] if labels else k, "scores": [round(float(p), 6) for p in z / z.sum()],
                        "logits": [float(x) for x in row]})
        truncated = [int(n) >= self.s.max_tokens for n in enc["attention_mask"].sum(1)]  # cut to max_tokens
        return {"adapter": adapter, "version": version, "outputs": out,
                **({"truncated": truncated} if any(truncated) else {})}

    def recover(self) -> None:
        """Reload model hpeft (a new stub process; adapters load again from the store) in the background;
        /healthz answers 503 meanwhile. Needs Triton's explicit model-control mode, as `hpeft serve` and
        deploy/ start it."""
        if not self._recovering.acquire(blocking=False):
            return

        def reload():
            try:  # a load of a loaded model whose files did not change is a no-op: unload first
                key = self.triton_key()
                self.client().unload_model(MODEL, headers=key, client_timeout=60)
                self.client().load_model(MODEL, headers=key, client_timeout=300)
            except Exception as e:  # noqa: BLE001 - Triton itself may be gone (/healthz tells), or the key is wrong
                logging.getLogger(__name__).warning("reloading model %r after its stub died failed: %s", MODEL,
                                                    _short(_text(e)))
            finally:
                self._recovering.release()
        threading.Thread(target=reload, name="hpeft-reload", daemon=True).start()

    def triton_key(self) -> dict[str, str]:
        """The headers of Triton's restricted APIs, for every model-control call: HPEFT_TRITON_KEY (Settings),
        else the key file of a tritonserver on this host (read at each call: a restarted server has a new key)."""
        from .serving.triton import find_key
        return triton_key_headers(self.s.triton_key or find_key(self.s.triton) or "")

    # ------------------------------------------------------------------ adapters
    def resident(self) -> dict[str, bool] | None:
        """Adapters resident in Triton's bank, from Triton's metrics (None if they cannot be read)."""
        try:
            with urllib.request.urlopen(self.s.triton_metrics, timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        return {m.group(1): float(m.group(2)) > 0
                for m in re.finditer(r'^hpeft_adapter_resident\{adapter="([^"]+)"\} (\S+)', text, re.M)}

    def adapters(self) -> list[dict]:
        resident = self.resident()
        out = []
        for name in self.store.names():
            meta = self.store.meta(name)
            if not isinstance(meta, dict):  # gone meanwhile, or not a json the gateway wrote
                continue
            out.append({"name": name, "method": meta.get("method"), "size": self.store.size(name),
                        "version": meta.get("sha256", "")[:16], "labels": meta.get("labels", []),
                        "loaded": None if resident is None else resident.get(name, False)})
        return out

    def put(self, name: str, raw: bytes) -> dict:
        try:
            check_name(name)
        except CheckpointError as e:
            raise GatewayError(400, str(e)) from None
        try:
            meta = embedded_meta(safetensors_header(raw))
            info = self._backbone_info()  # the graph may have been re-exported for more slot kinds
            tensors = check_pack(name, meta, raw, info)
            check_slots(name, Layout.from_dict(info["layout"]), tensors, meta["sizes"])
        except MissingSlots as e:
            raise GatewayError(409, str(e)) from None
        except CheckpointError as e:
            raise GatewayError(400, str(e)) from None
        replaced = self.store.stamp(name) is not None
        meta = meta | {"name": name, "sha256": hashlib.sha256(raw).hexdigest()}
        self.store.write(name, raw, meta)
        return {"name": name, "method": meta.get("method"), "version": meta["sha256"][:16], "size": len(raw),
                "replaced": replaced}

    def delete(self, name: str) -> dict:
        if not NAME.fullmatch(name) or not self.store.delete(name):
            raise GatewayError(404, f"unknown adapter {name!r}")
        return {"name": name, "deleted": True}


def _text(e: Exception) -> str:
    msg = getattr(e, "message", None)
    msg = msg() if callable(msg) else (msg or str(e))
    return str(msg or type(e).__name__).strip()


def _short(msg: str) -> str:
    return msg.splitlines()[0][:300] if msg else ""


def _triton_error(e, adapter: str) -> GatewayError:
    """The answer to a failed call of model hpeft: the status of the model's code when its message carries
    one; else what Triton's own failure means; else 502."""
    code, msg = parse(_text(e))
    if code is None:
        return _triton_failure(e, _short(msg))
    while True:  # one tag per row's error; the client sees none of them
        again, rest = parse(msg)
        if again is None:
            break
        msg = rest
    msg = _short(msg)
    text = {Code.UNKNOWN_ADAPTER: f"unknown adapter {adapter!r}: GET /v1/adapters lists the adapters",
            Code.ADAPTER_UPDATING: f"adapter {adapter!r} is being replaced; retry",
            Code.INTERNAL: f"model {MODEL!r} failed: {msg}"}.get(code, msg)
    return GatewayError(code.http, text, {"Retry-After": "1"} if code is Code.ADAPTER_UPDATING else None)


# ---------------------------------------------------------------------- Triton's own failures
# Triton's own errors carry no hpeft code; they are told apart here and nowhere else. By gRPC status: a model
# that is not loaded (NOT_FOUND without a tag: "Request for unknown model: 'hpeft' has no available
# versions"), Triton unreachable (UNAVAILABLE) or too slow (DEADLINE_EXCEEDED). By the one message that has
# no status of its own: a dead Python-backend stub (Triton 2.51: "Stub process 'hpeft_0_0' is not healthy.",
# INTERNAL), which Triton does not restart.
_UNAVAILABLE = {"StatusCode.NOT_FOUND": f"model {MODEL!r} is not loaded in Triton",
                "StatusCode.UNAVAILABLE": "Triton is not reachable",
                "StatusCode.DEADLINE_EXCEEDED": "Triton did not answer in time"}


def _dead_stub(msg: str) -> bool:
    return "Stub process" in msg and "is not healthy" in msg


def _triton_failure(e, msg: str) -> GatewayError:
    status, retry = str(e.status() or ""), {"Retry-After": "2"}
    if _dead_stub(msg):
        return GatewayError(503, f"model {MODEL!r} is restarting (its stub process died); retry shortly", retry)
    if status in _UNAVAILABLE:
        return GatewayError(503, f"{_UNAVAILABLE[status]} ({msg}); retry when GET /healthz answers 200", retry)
    return GatewayError(502, f"Triton failed the request: {msg}")


# ---------------------------------------------------------------------- HTTP
class PredictRequest(BaseModel):
    adapter: str = Field(min_length=1, max_length=128, examples=["rt-unipelt"])
    inputs: list[str] = Field(min_length=1, examples=[["a wonderful, moving film", "dull and far too long"]])


def create_app(settings: Settings | None = None):
    from fastapi import Depends, FastAPI, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.concurrency import run_in_threadpool

    class JSON(JSONResponse):
        """JSON with every non-ASCII character escaped: whatever str a client sent (a lone surrogate too)
        can be quoted back."""

        def render(self, content) -> bytes:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()

    settings = settings or Settings.from_env()
    gw = Gateway(settings)
    registry = CollectorRegistry()
    requests_total = Counter("hpeft_gateway_requests", "predict requests by adapter and HTTP status",
                             ["adapter", "code"], registry=registry)
    inputs_total = Counter("hpeft_gateway_inputs", "inputs (rows) predicted by adapter", ["adapter"], registry=registry)
    latency = Histogram("hpeft_gateway_request_seconds", "predict latency by adapter (gateway + Triton)",
                        ["adapter"], registry=registry,
                        buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10))
    writes_total = Counter("hpeft_gateway_adapter_writes", "adapter uploads and deletions by HTTP status",
                           ["op", "code"], registry=registry)

    app = FastAPI(title="hpeft-serve gateway", version="0.1.0", default_response_class=JSON,
                  description="Many hybrid-PEFT adapters on one frozen backbone, served by Triton.")
    app.state.gateway = gw

    @app.exception_handler(GatewayError)
    async def _gateway_error(_, e: GatewayError):
        return JSON({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_, e: RequestValidationError):
        return JSON({"detail": jsonable_encoder(e.errors())}, status_code=422)

    @app.exception_handler(Exception)  # the server logs the traceback; the client gets no stack frames
    async def _unexpected(_, e: Exception):
        return JSON({"error": f"internal error in the gateway ({type(e).__name__}); it is logged"}, status_code=500)

    def upload(scope) -> bool:
        return scope["method"] == "PUT" and scope["path"].startswith("/v1/adapters/")

    def refused(scope, _limit) -> None:  # a body over its limit (413), counted like the route's other answers
        if upload(scope):
            writes_total.labels("put", "413").inc()
        elif scope["path"] == "/v1/predict":
            requests_total.labels("_unknown", "413").inc()

    app.add_middleware(BodyLimit, refused=refused,
                       limit=lambda scope: settings.upload_limit if upload(scope) else settings.json_limit)

    def admin(request: Request) -> None:
        if not settings.admin_token:
            raise GatewayError(403, "adapter writes are disabled: start the gateway with HPEFT_ADMIN_TOKEN set")
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise GatewayError(401, "adapter writes need 'Authorization: Bearer <HPEFT_ADMIN_TOKEN>'",
                               {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(auth[7:].strip().encode(), settings.admin_token.encode()):
            raise GatewayError(403, "wrong admin token")

    @app.post("/v1/predict", summary="classify texts with one adapter")
    def predict(req: PredictRequest):
        t0 = time.perf_counter()
        label = "_unknown"
        try:
            out = gw.predict(req.adapter, req.inputs)
            label = req.adapter
        except GatewayError as e:  # metrics name an adapter only if it answered lately (bounded, real names)
            if e.status not in (404, 413):
                label = req.adapter if gw.answered(req.adapter) else "_other"
            requests_total.labels(label, str(e.status)).inc()
            raise
        dt = time.perf_counter() - t0
        requests_total.labels(label, "200").inc()
        inputs_total.labels(label).inc(len(req.inputs))
        latency.labels(label).observe(dt)
        return JSON(out | {"latency_ms": round(dt * 1000, 2)})  # already plain JSON types: no re-encoding

    @app.get("/v1/adapters", summary="the adapters in the store")
    def adapters():
        return {"adapters": gw.adapters()}

    @app.put("/v1/adapters/{name}", summary="upload or replace an adapter pack", dependencies=[Depends(admin)],
             status_code=201)
    async def put(name: str, request: Request):
        raw = await request.body()  # at most the upload limit: BodyLimit cuts a longer body off with 413
        try:
            out = await run_in_threadpool(gw.put, name, raw)
        except GatewayError as e:
            writes_total.labels("put", str(e.status)).inc()
            raise
        writes_total.labels("put", "201").inc()
        return out

    @app.delete("/v1/adapters/{name}", summary="remove an adapter", dependencies=[Depends(admin)])
    def delete(name: str):
        try:
            out = gw.delete(name)
        except GatewayError as e:
            writes_total.labels("delete", str(e.status)).inc()
            raise
        writes_total.labels("delete", "200").inc()
        return out

    @app.get("/healthz", summary="200 when the gateway and Triton's model are ready")
    def healthz():
        problem = gw.triton_state()
        if problem:
            return JSON({"status": "unavailable", "gateway": "ok", "triton": problem}, status_code=503)
        return {"status": "ok", "gateway": "ok", "triton": "ready"}

    @app.get("/livez", summary="200 while the gateway process runs")
    def livez():
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics")
    def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class GatewayThread:
    """uvicorn in a background thread (what `hpeft serve` runs beside tritonserver)."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 8080):
        import uvicorn
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                                    access_log=False))
        self.server.install_signal_handlers = lambda: None  # the caller owns the signals
        self.thread = threading.Thread(target=self.server.run, name="hpeft-gateway", daemon=True)

    def start(self, timeout: float = 30.0) -> "GatewayThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise HpeftError("the gateway did not start (is its port free?)")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
