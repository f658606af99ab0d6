"""The gateway's Prometheus metrics (one registry per app): requests, inputs and latency of predict (by
adapter) and of embeddings (by model), adapter writes, each by HTTP status. Metric labels name only adapters
that answered lately (bounded, and real names); any other name is "_other", a request refused before its
name was read (a body over its limit, an unknown name) "_unknown"."""

from __future__ import annotations

import time
from typing import Callable

from .errors import GatewayError

BUCKETS = (.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        self.registry = r = CollectorRegistry()
        self.routes = {
            "predict": (Counter("hpeft_gateway_requests", "predict requests by adapter and HTTP status",
                                ["adapter", "code"], registry=r),
                        Counter("hpeft_gateway_inputs", "inputs (rows) predicted by adapter", ["adapter"], registry=r),
                        Histogram("hpeft_gateway_request_seconds", "predict latency by adapter (gateway + Triton)",
                                  ["adapter"], registry=r, buckets=BUCKETS)),
            "embeddings": (Counter("hpeft_gateway_embedding_requests", "embedding requests by model and HTTP status",
                                   ["model", "code"], registry=r),
                           Counter("hpeft_gateway_embedding_inputs", "inputs (rows) embedded by model", ["model"],
                                   registry=r),
                           Histogram("hpeft_gateway_embedding_seconds", "embedding latency by model (gateway + Triton)",
                                     ["model"], registry=r, buckets=BUCKETS))}
        self.writes = Counter("hpeft_gateway_adapter_writes", "adapter uploads and deletions by HTTP status",
                              ["op", "code"], registry=r)

    def timed(self, route: str, name: str, known: Callable[[str], bool], call: Callable[[], tuple[dict, int]]):
        """Run `call` -> (answer, rows) and count it under `name` (or "_other"/"_unknown" on failures, unless
        `known(name)`); (answer, seconds)."""
        requests, inputs, latency = self.routes[route]
        t0 = time.perf_counter()
        try:
            out, rows = call()
        except GatewayError as e:
            label = "_unknown" if e.status in (404, 413) else name if known(name) else "_other"
            requests.labels(label, str(e.status)).inc()
            raise
        dt = time.perf_counter() - t0
        requests.labels(name, "200").inc()
        inputs.labels(name).inc(rows)
        latency.labels(name).observe(dt)
        return out, dt

    def write(self, op: str, call: Callable[[], dict]) -> dict:
        try:
            out = call()
        except GatewayError as e:
            self.writes.labels(op, str(e.status)).inc()
            raise
        self.writes.labels(op, "201" if op == "put" else "200").inc()
        return out

    def refused(self, scope: dict, _limit: int) -> None:
        """A body over its limit (413, answered by BodyLimit), counted like the route's other answers."""
        if scope["method"] == "PUT" and scope["path"].startswith("/v1/adapters/"):
            self.writes.labels("put", "413").inc()
        elif scope["path"] in ("/v1/predict", "/v1/embeddings"):
            self.routes["predict" if scope["path"] == "/v1/predict" else "embeddings"][0].labels("_unknown", "413").inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
