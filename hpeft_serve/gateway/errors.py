"""The gateway's errors: `GatewayError` (an HTTP status, a message for people, and for the OpenAI-compatible
routes the `param` and `code` of OpenAI's error body), and what a failed call of model `hpeft` means.

A refusal of the model carries a code (serving/codes.py) that sets the status, and the client sees the
message without its tag: unknown adapter 404, invalid input 400, adapter being replaced 503 + Retry-After,
invalid pack 422, internal error 502. Triton's own failures carry no code and are told apart here and nowhere
else (`triton_failure`): a dead stub (the model is reloaded), model not loaded, Triton unreachable or too
slow: 503 + Retry-After; else 502.

Bodies: {"error": MESSAGE} on the gateway's own routes; OpenAI's {"error": {"message", "type", "param",
"code"}} on /v1/embeddings and /v1/models (`openai_route`), so that OpenAI's clients raise their own classes.
"""

from __future__ import annotations

from ..serving.codes import Code, parse
from .settings import MODEL


class GatewayError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        self.param, self.code = param, code


def openai_route(path: str) -> bool:
    return path == "/v1/embeddings" or path == "/v1/models" or path.startswith("/v1/models/")


# OpenAI's error types by status (what its API answers; its clients pick the exception class by status)
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body of an error answer on `path`."""
    if not openai_route(path):
        return {"error": message}
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def text(e: Exception) -> str:
    msg = getattr(e, "message", None)
    msg = msg() if callable(msg) else (msg or str(e))
    return str(msg or type(e).__name__).strip()


def short(msg: str) -> str:
    return msg.splitlines()[0][:300] if msg else ""


def triton_error(e, adapter: str, unknown: str, param: str | None = None) -> GatewayError:
    """The answer to a failed call of model hpeft for `adapter` (`unknown`: the message of a 404, `param` the
    request field that named the adapter): the status of the model's code when its message carries one; else
    what Triton's own failure means; else 502."""
    code, msg = parse(text(e))
    if code is None:
        return triton_failure(e, short(msg))
    while True:  # one tag per row's error; the client sees none of them
        again, rest = parse(msg)
        if again is None:
            break
        msg = rest
    msg = short(msg)
    if code is Code.UNKNOWN_ADAPTER:
        return GatewayError(404, unknown, param=param, code="model_not_found")
    if code is Code.ADAPTER_UPDATING:
        return GatewayError(503, f"adapter {adapter!r} is being replaced; retry", {"Retry-After": "1"})
    return GatewayError(code.http, f"model {MODEL!r} failed: {msg}" if code is Code.INTERNAL else msg)


# By gRPC status: a model that is not loaded (NOT_FOUND without a tag: "Request for unknown model: 'hpeft'
# has no available versions"), Triton unreachable (UNAVAILABLE) or too slow (DEADLINE_EXCEEDED). By the one
# message that has no status of its own: a dead Python-backend stub (Triton 2.51: "Stub process 'hpeft_0_0'
# is not healthy.", INTERNAL), which Triton does not restart.
_UNAVAILABLE = {"StatusCode.NOT_FOUND": f"model {MODEL!r} is not loaded in Triton",
                "StatusCode.UNAVAILABLE": "Triton is not reachable",
                "StatusCode.DEADLINE_EXCEEDED": "Triton did not answer in time"}


def dead_stub(msg: str) -> bool:
    return "Stub process" in msg and "is not healthy" in msg


def triton_failure(e, msg: str) -> GatewayError:
    status, retry = str(e.status() or ""), {"Retry-After": "2"}
    if dead_stub(msg):
        return GatewayError(503, f"model {MODEL!r} is restarting (its stub process died); retry shortly", retry)
    if status in _UNAVAILABLE:
        return GatewayError(503, f"{_UNAVAILABLE[status]} ({msg}); retry when GET /healthz answers 200", retry)
    return GatewayError(502, f"Triton failed the request: {msg}")
