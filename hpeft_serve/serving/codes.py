"""Error codes that cross the process boundary between model `hpeft` (inside tritonserver) and its callers
(the gateway, `hpeft predict`, any KServe v2 client).

The model refuses a request with a message that starts with a tag, `[hpeft:CODE] `, and with the Triton
status of that code (`pb_utils.TritonError(message, pb_utils.TritonError.<Code.triton>)`). What a KServe v2
client of tritonserver 2.51 then sees (tests/test_faults.py): invalid input 400 / INVALID_ARGUMENT, unknown
adapter 404 / NOT_FOUND, adapter updating 503 / UNAVAILABLE, adapter invalid and internal 500 / INTERNAL
(Triton has no status for "present but unusable"; the gateway answers 422 and 502). Callers read the code
with `parse`, never by matching the wording: the message is for people, the code for programs. Both sides
import this one module.
"""

from __future__ import annotations

import re
from enum import Enum


class Code(str, Enum):
    """(value, Triton status name in pb_utils.TritonError, the gateway's HTTP status)."""

    UNKNOWN_ADAPTER = "unknown_adapter"  # no such pack in the store (or it was removed)
    INVALID_INPUT = "invalid_input"  # shape, dtype, token id, mask, sequence length, adapter name
    ADAPTER_UPDATING = "adapter_updating"  # the pack's files are being replaced: retry shortly
    ADAPTER_INVALID = "adapter_invalid"  # the pack exists but cannot be served (corrupt, mismatched sizes)
    INTERNAL = "internal"  # anything unexpected inside the model: a bug, reported per request

    @property
    def triton(self) -> str:
        return _TRITON[self]

    @property
    def http(self) -> int:
        return _HTTP[self]


_TRITON = {Code.UNKNOWN_ADAPTER: "NOT_FOUND", Code.INVALID_INPUT: "INVALID_ARG", Code.ADAPTER_UPDATING: "UNAVAILABLE",
           Code.ADAPTER_INVALID: "INTERNAL", Code.INTERNAL: "INTERNAL"}
_HTTP = {Code.UNKNOWN_ADAPTER: 404, Code.INVALID_INPUT: 400, Code.ADAPTER_UPDATING: 503, Code.ADAPTER_INVALID: 422,
         Code.INTERNAL: 502}
_TAG = re.compile(r"\[hpeft:([a-z_]+)\] ?")


def tag(code: Code, message: str) -> str:
    """The message as the model sends it: `[hpeft:CODE] message`."""
    return f"[hpeft:{code.value}] {message}"


def parse(message: str) -> tuple[Code | None, str]:
    """(code, message without its tag) from an error message; (None, message) when it carries no code
    (an error of Triton itself, or of a transport)."""
    m = _TAG.search(message or "")
    if m is None:
        return None, message
    try:
        code = Code(m.group(1))
    except ValueError:
        return None, message
    return code, (message[:m.start()] + message[m.end():]).strip()


class ModelError(ValueError):
    """A refusal raised inside the model, with its code (the message names the problem)."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code
