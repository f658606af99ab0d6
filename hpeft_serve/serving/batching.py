"""What both Triton models do with a dynamic batch: check each request's tokens, keep the readable ones
(an unreadable request gets its own error response), pad them to one length and concatenate them."""

from __future__ import annotations

import numpy as np


def check_tokens(ids: np.ndarray, mask: np.ndarray, max_len: int) -> None:
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [batch, seq]")
    if ids.shape[1] > max_len:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds the maximum {max_len}")


def collect(requests, read, error_response) -> tuple[list, list]:
    """[(index, *read(request))] for readable requests, and the response list with errors filled in."""
    parsed, responses = [], [None] * len(requests)
    for i, req in enumerate(requests):
        try:
            parsed.append((i, *read(req)))
        except ValueError as e:
            responses[i] = error_response(str(e))
    return parsed, responses


def pad_concat(arrays: list[np.ndarray]) -> np.ndarray:
    """[batch_i, seq_i] arrays -> one [sum batch_i, max seq_i] array, right-padded with zeros."""
    if len(arrays) == 1:
        return arrays[0]
    seq = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, ((0, 0), (0, seq - a.shape[1]))) for a in arrays])
