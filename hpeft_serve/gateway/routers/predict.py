"""POST /v1/predict {"adapter": NAME, "inputs": [TEXT, ...]} -> label, scores and logits per input."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ..deps import GatewayDep, MetricsDep
from ..responses import JSON

router = APIRouter(tags=["predict"])


class PredictRequest(BaseModel):
    adapter: str = Field(min_length=1, max_length=128, examples=["rt-unipelt"])
    inputs: list[str] = Field(min_length=1, examples=[["a wonderful, moving film", "dull and far too long"]])


@router.post("/v1/predict", summary="classify texts with one adapter")
def predict(req: PredictRequest, gw: GatewayDep, metrics: MetricsDep):
    out, dt = metrics.timed("predict", req.adapter, gw.answered,
                            lambda: (gw.predict(req.adapter, req.inputs), len(req.inputs)))
    return JSON(out | {"latency_ms": round(dt * 1000, 2)})  # already plain JSON types: no re-encoding
