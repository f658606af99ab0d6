"""The models and adapters the gateway serves.

    GET    /v1/models             OpenAI's model list: the backbone without adapter, then every adapter
    GET    /v1/models/{model_id}  one of them (404 in OpenAI's error shape if none)
    GET    /v1/adapters           name, method, task, size, version, labels, loaded (resident in Triton's bank)
    PUT    /v1/adapters/{name}    body: a pack's .safetensors (its header carries the pack json); bearer token
    DELETE /v1/adapters/{name}    bearer token
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..deps import Admin, GatewayDep, MetricsDep

router = APIRouter()


@router.get("/v1/models", summary="the models (backbone and adapters), as OpenAI lists them", tags=["openai"])
def models(gw: GatewayDep):
    return {"object": "list", "data": gw.models()}


@router.get("/v1/models/{model_id}", summary="one model, as OpenAI shows it", tags=["openai"])
def model(model_id: str, gw: GatewayDep):
    return gw.model(model_id)


@router.get("/v1/adapters", summary="the adapters in the store", tags=["adapters"])
def adapters(gw: GatewayDep):
    return {"adapters": gw.adapters()}


@router.put("/v1/adapters/{name}", summary="upload or replace an adapter pack", status_code=201, tags=["adapters"])
async def put(name: str, request: Request, _: Admin, gw: GatewayDep, metrics: MetricsDep):
    raw = await request.body()  # at most the upload limit: BodyLimit cuts a longer body off with 413
    return await run_in_threadpool(metrics.write, "put", lambda: gw.put(name, raw))


@router.delete("/v1/adapters/{name}", summary="remove an adapter", tags=["adapters"])
def delete(name: str, _: Admin, gw: GatewayDep, metrics: MetricsDep):
    return metrics.write("delete", lambda: gw.delete(name))
