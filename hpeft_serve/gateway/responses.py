"""The gateway's JSON responses: every non-ASCII character escaped, so that whatever str a client sent (a
lone surrogate too) can be quoted back; no NaN or infinity."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse


class JSON(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()
