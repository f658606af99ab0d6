"""GET /healthz (200 when the gateway and Triton's model `hpeft` are ready, else 503), GET /livez (200 while
the process runs), GET /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from ..deps import GatewayDep, MetricsDep
from ..responses import JSON

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="200 when the gateway and Triton's model are ready")
def healthz(gw: GatewayDep):
    problem = gw.triton_state()
    if problem:
        return JSON({"status": "unavailable", "gateway": "ok", "triton": problem}, status_code=503)
    return {"status": "ok", "gateway": "ok", "triton": "ready"}


@router.get("/livez", summary="200 while the gateway process runs")
def livez():
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics")
def metrics(m: MetricsDep):
    body, media_type = m.render()
    return PlainTextResponse(body, media_type=media_type)
