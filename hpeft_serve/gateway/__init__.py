"""The REST gateway (FastAPI) in front of Triton: text in, labels or embeddings out, adapters managed over HTTP.

    POST   /v1/predict            {"adapter": NAME, "inputs": [TEXT, ...]} -> label, scores, logits per input
    POST   /v1/embeddings         OpenAI-compatible: {"model": NAME, "input": ...} -> one vector per input
    GET    /v1/models             OpenAI's model list: the backbone (no adapter) and every adapter
    GET    /v1/models/{model_id}  one of them
    GET    /v1/adapters           name, method, task, size, version, labels, loaded (resident in Triton's bank)
    PUT    /v1/adapters/{name}    body: a pack's .safetensors (its header carries the pack json); bearer token
    DELETE /v1/adapters/{name}    bearer token
    GET    /healthz               200 when the gateway and Triton's model `hpeft` are ready, else 503
    GET    /livez                 200 while the process runs
    GET    /metrics               Prometheus: requests, errors and latency per adapter (embeddings: per model)
    GET    /docs                  OpenAPI

The package, as FastAPI's larger applications are laid out: app.py (`create_app(settings)`, the lifespan that
opens and closes the Triton client, error handlers, `GatewayThread`), settings.py, service.py (`Gateway`:
tokenizer, Triton client, answers) with catalog.py (the adapter store as the routes show and change it),
embed.py (OpenAI's embeddings API), errors.py (statuses, Triton's failures, OpenAI's error shape), limits.py
(body limits on the stream, bounded caches), metrics.py, deps.py (the routes' `Annotated` dependencies),
responses.py, and routers/ (one per resource: predict, embeddings, models and adapters, health).

Statuses (errors.py): unknown adapter 404, invalid input 400, adapter being replaced 503 + Retry-After,
invalid pack 422, internal error 502; Triton unreachable, too slow, model not loaded or its stub dead 503 +
Retry-After. The gateway's own: a text with a lone surrogate 400 naming the input, too many inputs or
characters 413 on /v1/predict (400 on /v1/embeddings, as OpenAI answers), a bad upload 400 (409: the graph
lacks its slot kinds), a malformed request 422 (400 on the OpenAI routes), an unexpected error 500 with a
short message (the server logs the traceback). /v1/embeddings and /v1/models answer errors in OpenAI's body
shape {"error": {"message", "type", "param", "code"}}; the other routes {"error": MESSAGE}.

Limits: a body over its route's limit is 413 as soon as it passes it, declared or chunked (limits.py):
PUT /v1/adapters/{name} HPEFT_MAX_UPLOAD_MB, any other route MAX_INPUTS x (6 x MAX_CHARS + 4) + 64 KiB
(a valid predict request at its limits, every character a 6-byte JSON escape). Caches keyed by what clients
send are bounded (LABEL_CACHE adapter names, least recently answered out first).

Settings come from arguments or the environment (settings.ENV): HPEFT_REPO, HPEFT_TRITON_GRPC,
HPEFT_TRITON_METRICS, HPEFT_ADAPTER_STORE, HPEFT_ADMIN_TOKEN, HPEFT_TRITON_KEY, HPEFT_MAX_UPLOAD_MB,
HPEFT_MAX_INPUTS, HPEFT_MAX_CHARS, HPEFT_MAX_TOKENS.
"""

from .app import GatewayThread, create_app
from .errors import GatewayError
from .service import BACKBONE, LABEL_CACHE, Gateway
from .settings import ENV, MODEL, Settings

__all__ = ["BACKBONE", "ENV", "LABEL_CACHE", "MODEL", "Gateway", "GatewayError", "GatewayThread", "Settings",
           "create_app"]
