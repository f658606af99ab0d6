"""What both Triton models do with a dynamic batch: check each request's tokens (dtype, shape, length, every
token id inside the vocabulary, masks of 0/1 with at least one 1 per row), keep the valid ones (an invalid
request gets its own coded error response, its neighbours are answered), pad them to one length and
concatenate them; and how a refusal becomes a Triton error (`[hpeft:CODE] message` with the code's status).

The checks run before the forward because onnxruntime cannot fail one row: an id past the vocabulary fails
the Gather of the whole batch, and a negative id is silently wrapped to another token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .codes import Code, ModelError, tag


@dataclass(frozen=True)
class Limits:
    """What a request's tokens must fit: ids in [0, vocab), at most max_len tokens a row."""

    vocab: int
    max_len: int


def position_limit(model_type: str, max_positions: int) -> int:
    """The longest sequence the position table holds: RoBERTa-style encoders count positions from
    padding_idx + 1 (= 2), the others from 0."""
    return max_positions - 2 if model_type in ("roberta", "xlm-roberta") else max_positions


NO_LIMIT = 1 << 62


def graph_limits(path, max_len: int = 512) -> Limits:
    """The Limits of an exported ONNX encoder read from its graph (no weights loaded): the vocabulary is the
    table the Gather on input_ids reads, the longest sequence at most `max_len` and the position table's
    rows (RoBERTa-style graphs, which count positions with a CumSum from padding_idx + 1: two fewer). A
    graph without a position table (relative positions) has only `max_len`; one whose word table is not
    found has no vocabulary check (its model then runs a failing batch again one request at a time)."""
    import onnx
    g = onnx.load(str(path), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in g.initializer}
    vocab = next((dims[n.input[0]][0] for n in g.node
                  if n.op_type == "Gather" and n.input[1:2] == ["input_ids"] and n.input[0] in dims), NO_LIMIT)
    rows = next((d[0] for name, d in dims.items() if name.endswith("position_embeddings.weight")), None)
    if rows is not None:
        max_len = min(max_len, rows - 2 if any(n.op_type == "CumSum" for n in g.node) else rows)
    return Limits(vocab, max_len)


def check_tokens(ids: np.ndarray, mask: np.ndarray, limits: Limits) -> None:
    """ModelError(INVALID_INPUT) naming what is wrong with a request's input_ids / attention_mask."""
    for what, a in (("input_ids", ids), ("attention_mask", mask)):
        if a.dtype != np.int64:
            raise ModelError(Code.INVALID_INPUT, f"{what} must be INT64, not {a.dtype}")
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ModelError(Code.INVALID_INPUT, f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} "
                                             "must both be [batch, seq]")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ModelError(Code.INVALID_INPUT, f"input_ids {list(ids.shape)} is empty: give at least one token a row")
    if ids.shape[1] > limits.max_len:
        raise ModelError(Code.INVALID_INPUT, f"sequence length {ids.shape[1]} exceeds the maximum {limits.max_len}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= limits.vocab:
        bad = lo if lo < 0 else hi
        raise ModelError(Code.INVALID_INPUT, f"token id {bad} is outside the vocabulary [0, {limits.vocab})")
    if not np.isin(mask, (0, 1)).all():
        bad = int(mask[~np.isin(mask, (0, 1))].flat[0])
        raise ModelError(Code.INVALID_INPUT, f"attention_mask holds {bad}: its values must be 0 or 1")
    empty = np.flatnonzero(mask.max(axis=1) == 0)
    if empty.size:
        raise ModelError(Code.INVALID_INPUT, f"attention_mask row {int(empty[0])} is all zeros: each row needs "
                                             "at least one token")


def triton_error(pb_utils, code: Code, message: str):
    """The Triton error of a refusal: tagged message, and the code's status (400 / 404 / 503 / 500 over
    KServe v2 REST; INVALID_ARGUMENT / NOT_FOUND / UNAVAILABLE / INTERNAL over gRPC)."""
    return pb_utils.TritonError(tag(code, message), getattr(pb_utils.TritonError, code.triton))


def error_response(pb_utils, code: Code, message: str):
    return pb_utils.InferenceResponse(error=triton_error(pb_utils, code, message))


def collect(requests, read, refuse, log) -> tuple[list, list]:
    """[(index, *read(request))] for readable requests, and the response list with each unreadable request's
    refusal filled in (`refuse(code, message)`); an unexpected exception is INTERNAL (traceback to `log`)."""
    parsed, responses = [], [None] * len(requests)
    for i, req in enumerate(requests):
        try:
            parsed.append((i, *read(req)))
        except ModelError as e:
            responses[i] = refuse(e.code, str(e))
        except Exception:  # noqa: BLE001 - a bug reading one request fails that request only
            log_internal(log, "reading a request")
            responses[i] = refuse(Code.INTERNAL, "the request could not be read (internal error; see the server log)")
    return parsed, responses


def log_internal(log, what: str) -> None:
    import traceback
    log(f"hpeft: internal error {what}:\n{traceback.format_exc()}")


def pad_concat(arrays: list[np.ndarray]) -> np.ndarray:
    """[batch_i, seq_i] arrays -> one [sum batch_i, max seq_i] array, right-padded with zeros."""
    if len(arrays) == 1:
        return arrays[0]
    seq = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, ((0, 0), (0, seq - a.shape[1]))) for a in arrays])
