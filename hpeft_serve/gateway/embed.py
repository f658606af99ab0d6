"""OpenAI's embeddings API on model `hpeft` (`embed`, called by POST /v1/embeddings).

`model` is an adapter name, or the backbone's model id (the last part of its name, as GET /v1/models lists
it) for the backbone without adapter, which Triton's model names "@backbone". `input` is a string, a list of
strings, a list of token ids, or a list of lists of token ids; token ids are the model's input_ids as they
are (the tokenizer's special tokens, [CLS] ... [SEP], are the caller's to include), each checked against the
vocabulary of the served graph (backbone.json dims.vocab). An input longer than the model takes is refused,
never cut short (as OpenAI does). `encoding_format` "float" gives lists of numbers, "base64" the float32
little-endian bytes of each vector in base64 (as OpenAI does). `dimensions` is refused: no adapter can
shorten its vectors. Usage counts the tokens embedded (special tokens included).

A classifier adapter asked for embeddings is a 400 that names POST /v1/predict (the pack json's "task" says
which kind an adapter is), as an embedding adapter asked for /v1/predict names this route.
"""

from __future__ import annotations

import base64
import json

import numpy as np

from ..names import NAME
from .errors import GatewayError
from .service import BACKBONE

MODELS = "GET /v1/models lists the models"


def _bad(message: str, param: str = "input") -> GatewayError:
    return GatewayError(400, message, param=param)


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)  # noqa: E721 - bool is not a token id


def split_input(value) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token id lists) of an OpenAI `input`; a 400 naming what is wrong otherwise."""
    if isinstance(value, str):
        return [value], None
    if not isinstance(value, list):
        raise _bad(f"input must be a string, a list of strings, a list of token ids or a list of lists of token "
                   f"ids, not {type(value).__name__}")
    if not value:
        raise _bad("input is empty: give at least one string or token id list")
    if all(isinstance(x, str) for x in value):
        return value, None
    if _is_ids(value):
        return None, [value]
    if all(_is_ids(x) for x in value):
        return None, value
    kind = str if isinstance(value[0], str) else list if isinstance(value[0], list) else int
    i, x = next((i, x) for i, x in enumerate(value) if not (isinstance(x, str) if kind is str else
                                                             _is_ids(x) if kind is list else type(x) is int))
    raise _bad(f"input[{i}] is {json.dumps(x)[:40]}: input must be all strings, all token ids, or all lists of "
               "token ids")


def check_ids(lists: list[list[int]], vocab: int, max_tokens: int, max_inputs: int) -> None:
    if len(lists) > max_inputs:
        raise _bad(f"{len(lists)} inputs in one request; at most {max_inputs}")
    for i, ids in enumerate(lists):
        if not ids:
            raise _bad(f"input {i} is an empty list of token ids")
        if len(ids) > max_tokens:
            raise _bad(f"input {i} has {len(ids)} tokens; this model takes at most {max_tokens}")
        bad = next((j for j, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise _bad(f"input {i}: token id {ids[bad]} at position {bad} is out of range: the vocabulary has "
                       f"{vocab} ids (0 to {vocab - 1})")


def pad(lists: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 [batch, longest], the shorter rows padded with `pad_id`, mask 0."""
    n = max(len(x) for x in lists)
    ids, mask = np.full((len(lists), n), pad_id, np.int64), np.zeros((len(lists), n), np.int64)
    for r, x in enumerate(lists):
        ids[r, :len(x)], mask[r, :len(x)] = x, 1
    return ids, mask


def encode(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.astype(np.float32).tolist()  # each float32 exactly (as a double): it reads back the same


def embed(gw, model: str, value, encoding_format: str = "float", dimensions: int | None = None) -> dict:
    """The OpenAI answer {"object": "list", "data": [...], "model", "usage"}; a GatewayError otherwise."""
    unknown = f"the model {model!r} does not exist: {MODELS}"
    if model != gw.model_id and not NAME.fullmatch(model):
        raise GatewayError(404, unknown, param="model", code="model_not_found")
    if dimensions is not None:
        raise _bad(f"dimensions is not supported by model {model!r}: its embeddings have "
                   f"{gw.info['dims']['d']} dimensions, and no adapter here can shorten them", "dimensions")
    ids, mask = batch(gw, value)
    adapter = BACKBONE if model == gw.model_id else model
    res, version = gw.infer(adapter, ids, mask, unknown, "model")
    if adapter != BACKBONE and gw.pack_info(model, version)[1] != "embedding":
        raise _bad(f"model {model!r} is a classifier adapter, not an embedding one: POST /v1/predict with "
                   f"\"adapter\": {json.dumps(model)} answers it", "model")
    vectors = res.as_numpy("embeddings")
    if vectors is None:
        raise GatewayError(502, "model 'hpeft' gave no embeddings: redeploy the shared backbone with this version")
    vectors = vectors.reshape(len(ids), -1)
    n = int(mask.sum())
    return {"object": "list", "model": model, "usage": {"prompt_tokens": n, "total_tokens": n},
            "data": [{"object": "embedding", "index": i, "embedding": encode(v, encoding_format)}
                     for i, v in enumerate(vectors)]}


def batch(gw, value) -> tuple[np.ndarray, np.ndarray]:
    """The model's (input_ids, attention_mask) of an OpenAI `input`, every input checked."""
    limit = min(gw.s.max_tokens, int(gw.info["dims"].get("max_positions") or gw.s.max_tokens))
    texts, lists = split_input(value)
    if lists is not None:
        check_ids(lists, int(gw.info["dims"]["vocab"]), limit, gw.s.max_inputs)
        return pad(lists, gw.tokenizer().pad_token_id or 0)
    gw.check_texts(texts, status=400)
    empty = next((i for i, t in enumerate(texts) if not t), None)
    if empty is not None:
        raise _bad(f"input {empty} is an empty string")
    ids, mask = gw.tokenize(texts, None)
    long = next((i for i, n in enumerate(mask.sum(1)) if n > limit), None)
    if long is not None:
        raise _bad(f"input {long} has {int(mask[long].sum())} tokens; this model takes at most {limit} "
                   "(it is refused, not cut short)")
    return ids, mask
