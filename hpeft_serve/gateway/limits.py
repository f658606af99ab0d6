"""What the gateway bounds, so that no client can grow its memory: request bodies, on the stream, and caches
keyed by what clients send.

`BodyLimit` is a pure ASGI middleware that counts the bytes of a request's `http.request` messages as they
arrive and answers 413 as soon as they pass the route's limit, whether the size was declared
(Content-Length: refused before a byte is read) or not (chunked transfer encoding: cut off at the limit).
A body is never read, held or parsed past its limit. The 413 closes the connection (`Connection: close`):
the rest of the body is never read. The application behind sees the request end (`http.disconnect`), and
what it answers then is dropped. A route that answers without reading the body (GET /healthz with a
chunked body) closes the connection too: the body it did not read is not read after it either.

`BoundedCache` is an LRU dict of a fixed size.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Awaitable, Callable

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """`limit(scope)` -> the most bytes the request's body may have; `refused(scope, limit)`, if given, is
    called once for each request refused (metrics); `body(scope, message)`, if given, is the JSON body of the
    413 (default {"error": message})."""

    def __init__(self, app, limit: Callable[[Scope], int], refused: Callable[[Scope, int], None] | None = None,
                 body: Callable[[Scope, str], dict] | None = None):
        self.app, self.limit, self.refused = app, limit, refused
        self.body = body or (lambda _scope, message: {"error": message})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope)
        declared = _header(scope, b"content-length")
        if _int(declared) > limit:
            return await self._refuse(scope, send, limit)
        received, answered, started = 0, False, False
        pending = _int(declared) > 0 or b"chunked" in _header(scope, b"transfer-encoding").lower()

        async def receive_limited() -> Message:
            nonlocal received, answered, pending
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                pending = pending and message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit:
                    if not started:  # the application has not answered yet: the answer is ours
                        answered = True
                        await self._refuse(scope, send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_answered(message: Message) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
                if pending:  # answered before the body was read: the rest is never read
                    message = message | {"headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, receive_limited, send_unless_answered)
        except Exception:
            if not answered:  # after our 413 the application's complaint about the cut-off body is moot
                raise

    async def _refuse(self, scope: Scope, send: Send, limit: int) -> None:
        if self.refused is not None:
            self.refused(scope, limit)
        message = f"request body over the limit of {limit / 2 ** 20:.2f} MiB for {scope['method']} {scope['path']}"
        body = json.dumps(self.body(scope, message)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes:
    return next((v for k, v in scope.get("headers", ()) if k == name), b"")


def _int(value: bytes) -> int:
    """A declared body size (0 when none, or not a number: the stream is counted anyway)."""
    try:
        return int(value or 0)
    except ValueError:
        return 0


class BoundedCache:
    """A dict of at most `size` entries, the least recently used out first; safe across threads."""

    def __init__(self, size: int):
        self.size, self._d, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            if key not in self._d:
                return default
            self._d.move_to_end(key)
            return self._d[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._d

    def __len__(self) -> int:
        return len(self._d)
