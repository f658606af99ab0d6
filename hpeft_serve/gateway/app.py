"""The FastAPI application (`create_app(settings)`) and uvicorn in a background thread (`GatewayThread`).

The app holds one `Gateway` (app.state.gateway, built at creation: a repository without a shared-backbone
export fails here, not on the first request) and one `Metrics`; its lifespan opens the Triton client at start
and closes it at shutdown. Error answers: see errors.py (OpenAI's error shape on the OpenAI-compatible
routes); a malformed request 422 ({"detail": ...}; 400 in OpenAI's shape on its routes); an unexpected error
a short 500 (the server logs the traceback). Bodies over their route's limit: 413 (limits.BodyLimit).
"""

from __future__ import annotations

import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError

from ..errors import HpeftError
from .errors import GatewayError, error_body, openai_route
from .limits import BodyLimit
from .metrics import Metrics
from .responses import JSON
from .routers import embeddings, health, models, predict
from .service import Gateway
from .settings import Settings


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.gateway.open()
    try:
        yield
    finally:
        app.state.gateway.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    app = FastAPI(title="hpeft-serve gateway", version="0.1.0", default_response_class=JSON, lifespan=lifespan,
                  description="Many hybrid-PEFT adapters on one frozen backbone, served by Triton; "
                              "OpenAI-compatible embeddings.")
    app.state.gateway, app.state.metrics = Gateway(settings), Metrics()
    for r in (predict.router, embeddings.router, models.router, health.router):
        app.include_router(r)
    _handlers(app)

    def upload(scope) -> bool:
        return scope["method"] == "PUT" and scope["path"].startswith("/v1/adapters/")

    app.add_middleware(BodyLimit, refused=app.state.metrics.refused,
                       limit=lambda scope: settings.upload_limit if upload(scope) else settings.json_limit,
                       body=lambda scope, message: error_body(scope["path"], 413, message))
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, e: GatewayError):
        return JSON(error_body(request.url.path, e.status, e.message, e.param, e.code), status_code=e.status,
                    headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, e: RequestValidationError):
        if openai_route(request.url.path):  # OpenAI answers a malformed request 400
            return JSON(error_body(request.url.path, 400, *_describe(e.errors())), status_code=400)
        return JSON({"detail": jsonable_encoder(e.errors())}, status_code=422)

    @app.exception_handler(Exception)  # the server logs the traceback; the client gets no stack frames
    async def _unexpected(request: Request, e: Exception):
        message = f"internal error in the gateway ({type(e).__name__}); it is logged"
        return JSON(error_body(request.url.path, 500, message), status_code=500)


def _describe(errors) -> tuple[str, str | None]:
    """(a message naming the first problems of a malformed request, the field of the first)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON", None
    fields = [".".join(str(p) for p in e.get("loc", ())[1:]) or "body" for e in errors]
    parts = [f"{f}: {e.get('msg', 'invalid')}" for f, e in zip(fields, errors)][:3]
    return "invalid request: " + "; ".join(parts), fields[0] if fields else None


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
