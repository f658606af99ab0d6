"""What the adapter store holds, as the gateway shows and changes it (`Catalog`, a part of `Gateway`): the
adapter listing (with residency in Triton's bank, from Triton's metrics), the OpenAI model list (the backbone
and every adapter), and uploads and deletions.

Uploads are validated against the served backbone and slot layout before a byte reaches the store, and
written tensors-first, json-last, so the model picks the new version up on its next request (a request sees
the old or the new adapter, never a mix).
"""

from __future__ import annotations

import hashlib
import re
import urllib.request

from ..errors import CheckpointError
from ..names import NAME, check_name
from ..pack.check import MissingSlots, check_pack, check_slots, embedded_meta, safetensors_header
from ..pack.layout import Layout
from .errors import GatewayError

OWNER = "hpeft"  # `owned_by` of every model in GET /v1/models


def _seconds(stamp) -> int:
    """A store's modification time (ns or s since the epoch; a remote store may give none) as OpenAI's
    `created` (s since the epoch, 0 when unknown)."""
    t = stamp[0] if isinstance(stamp, tuple) and stamp else None
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return int(t // 1_000_000_000) if t > 1e12 else int(t)
    return 0


def _model(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}


class Catalog:
    """Needs `self.s` (Settings), `self.store` (PackStore), `self.model_id` and `self._backbone_info()`."""

    def resident(self) -> dict[str, bool] | None:
        """Adapters resident in Triton's bank, from Triton's metrics (None if they cannot be read)."""
        try:
            with urllib.request.urlopen(self.s.triton_metrics, timeout=2) as r:
                body = r.read().decode()
        except OSError:
            return None
        return {m.group(1): float(m.group(2)) > 0
                for m in re.finditer(r'^hpeft_adapter_resident\{adapter="([^"]+)"\} (\S+)', body, re.M)}

    def _metas(self):
        for name in self.store.names():
            meta = self.store.meta(name)
            if isinstance(meta, dict):  # else gone meanwhile, or not a json the gateway wrote
                yield name, meta

    def adapters(self) -> list[dict]:
        resident = self.resident()
        return [{"name": name, "method": meta.get("method"), "task": meta.get("task", "classification"),
                 "size": self.store.size(name), "version": meta.get("sha256", "")[:16],
                 "labels": meta.get("labels", []), "loaded": None if resident is None else resident.get(name, False)}
                for name, meta in self._metas()]

    def models(self) -> list[dict]:
        """OpenAI's model objects: the backbone without adapter first (its id the backbone's model id), then
        every adapter (classifiers too: GET /v1/adapters says which task each has)."""
        return [_model(self.model_id, 0)] + [_model(name, _seconds(self.store.stamp(name))) for name, _ in self._metas()]

    def model(self, model_id: str) -> dict:
        if model_id == self.model_id:
            return _model(model_id, 0)
        if NAME.fullmatch(model_id) and self.store.meta(model_id) is not None:
            return _model(model_id, _seconds(self.store.stamp(model_id)))
        raise GatewayError(404, f"the model {model_id!r} does not exist: GET /v1/models lists the models",
                           param="model", code="model_not_found")

    def put(self, name: str, raw: bytes) -> dict:
        try:
            check_name(name)
        except CheckpointError as e:
            raise GatewayError(400, str(e)) from None
        if name == self.model_id:
            raise GatewayError(400, f"adapter name {name!r} is the backbone's model id (the backbone without "
                                    "adapter in /v1/embeddings and /v1/models): choose another name")
        try:
            meta = embedded_meta(safetensors_header(raw))
            info = self._backbone_info()  # the graph may have been re-exported for more slot kinds
            tensors = check_pack(name, meta, raw, info)
            check_slots(name, Layout.from_dict(info["layout"]), tensors, meta["sizes"])
        except MissingSlots as e:
            raise GatewayError(409, str(e)) from None
        except CheckpointError as e:
            raise GatewayError(400, str(e)) from None
        replaced = self.store.stamp(name) is not None
        meta = meta | {"name": name, "sha256": hashlib.sha256(raw).hexdigest()}
        self.store.write(name, raw, meta)
        return {"name": name, "method": meta.get("method"), "task": meta.get("task", "classification"),
                "version": meta["sha256"][:16], "size": len(raw), "replaced": replaced}

    def delete(self, name: str) -> dict:
        if not NAME.fullmatch(name) or not self.store.delete(name):
            raise GatewayError(404, f"unknown adapter {name!r}")
        return {"name": name, "deleted": True}
