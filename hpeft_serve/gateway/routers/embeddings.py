"""POST /v1/embeddings, compatible with OpenAI's embeddings API (what it accepts and answers: ../embed.py)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ..embed import embed
from ..deps import GatewayDep, MetricsDep
from ..responses import JSON

router = APIRouter(tags=["openai"])

INPUT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                          {"type": "array", "items": {"type": "integer"}},
                          {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}]}


class EmbeddingsRequest(BaseModel):
    model: str = Field(min_length=1, max_length=256, description="an adapter name, or the backbone's model id "
                       "for the backbone without adapter (GET /v1/models)", examples=["minilm"])
    input: Any = Field(description="a string, a list of strings, a list of token ids or a list of lists of "
                       "token ids", json_schema_extra=INPUT_SCHEMA, examples=[["a wonderful, moving film"]])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="not supported (400)")
    user: str | None = Field(None, description="accepted and ignored")


@router.post("/v1/embeddings", summary="embed texts or token ids with one adapter (OpenAI-compatible)")
def create_embeddings(req: EmbeddingsRequest, gw: GatewayDep, metrics: MetricsDep):
    def call():
        out = embed(gw, req.model, req.input, req.encoding_format, req.dimensions)
        return out, len(out["data"])
    known = lambda name: name == gw.model_id or gw.answered(name)  # noqa: E731
    return JSON(metrics.timed("embeddings", req.model, known, call)[0])
