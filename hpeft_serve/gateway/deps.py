"""The routes' dependencies, as `Annotated` aliases: the app's `Gateway` (GatewayDep), its `Metrics`
(MetricsDep), and the admin check of adapter writes (Admin: a bearer token equal to HPEFT_ADMIN_TOKEN)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from .errors import GatewayError
from .metrics import Metrics
from .service import Gateway


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def metrics(request: Request) -> Metrics:
    return request.app.state.metrics


GatewayDep = Annotated[Gateway, Depends(gateway)]
MetricsDep = Annotated[Metrics, Depends(metrics)]


def admin(request: Request, gw: GatewayDep) -> None:
    token = gw.s.admin_token
    if not token:
        raise GatewayError(403, "adapter writes are disabled: start the gateway with HPEFT_ADMIN_TOKEN set")
    auth = request.headers.get("authorization", "")
    if not auth.lower().startswith("bearer "):
        raise GatewayError(401, "adapter writes need 'Authorization: Bearer <HPEFT_ADMIN_TOKEN>'",
                           {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
        raise GatewayError(403, "wrong admin token")


Admin = Annotated[None, Depends(admin)]
