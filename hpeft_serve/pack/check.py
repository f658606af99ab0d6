"""Validating a pack: its safetensors bytes and json against the served backbone and the slot layout
(json and safetensors only; nothing is unpickled)."""

from __future__ import annotations

import json

import numpy as np

from ..errors import CheckpointError
from .layout import LAYOUT_VERSION, Layout, needs, resolve_shape, spec


SIZE_KEYS = ("L", "d", "f", "P", "n", "C", "r")


class MissingSlots(CheckpointError):
    """A valid pack that needs slot kinds the deployed graph does not take."""


def check_slots(name: str, layout: Layout, tensors: dict, sizes: dict) -> None:
    if not layout.covers(needs(tensors, sizes)):
        raise MissingSlots(f"adapter {name!r} needs slots the deployed graph lacks: deploy its export with "
                           "`hpeft deploy`, which extends the graph")



def safetensors_header(raw: bytes) -> dict:
    """The JSON header of a safetensors file (read with json only), or CheckpointError."""
    if len(raw) < 8:
        raise CheckpointError("not a safetensors file (too short)")
    n = int.from_bytes(raw[:8], "little")
    if n <= 1 or n > min(len(raw) - 8, 100 << 20):
        raise CheckpointError("not a safetensors file (no valid header); a pickle or .bin file is never read")
    try:
        header = json.loads(raw[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError("not a safetensors file (its header is not a JSON object)")
    return header


def check_pack(name: str, meta: dict, raw: bytes, graph: dict) -> dict[str, np.ndarray]:
    """Validate a pack (its json `meta` and safetensors bytes `raw`) against the served graph (`graph`: its
    backbone.json) and the layout: every tensor present, float32, finite, of the shape its sizes give.
    Returns the tensors."""
    backbone_sha256 = graph["backbone"]["sha256"]
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_bytes
    if meta.get("format") != "hpeft-pack" or meta.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(f"adapter {name!r} is not an hpeft pack of layout version {LAYOUT_VERSION}: "
                              "export it with `hpeft export` (without --merge)")
    if meta.get("backbone", {}).get("sha256") != backbone_sha256:
        raise CheckpointError(f"adapter {name!r} was exported for backbone "
                              f"{meta.get('backbone', {}).get('name')!r}, not the one this graph serves")
    safetensors_header(raw)
    try:
        tensors = load_bytes(raw)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"adapter {name!r}: not a readable safetensors file ({e})") from None
    sizes = meta.get("sizes")
    want = spec()
    if not isinstance(sizes, dict) or any(not isinstance(sizes.get(k), int) or sizes[k] < 0 for k in SIZE_KEYS):
        raise CheckpointError(f"adapter {name!r}: its json has no valid sizes")
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise CheckpointError(f"adapter {name!r}: tensors do not match the pack layout "
                              f"(missing {missing[:4]}, unexpected {extra[:4]})")
    for k, symbols in want.items():
        t = tensors[k]
        try:
            shape = resolve_shape(symbols, sizes)
        except (KeyError, ZeroDivisionError):
            raise CheckpointError(f"adapter {name!r}: its sizes lack what {k} needs") from None
        if t.dtype != np.float32 or t.shape != shape:
            raise CheckpointError(f"adapter {name!r}: tensor {k} is {t.dtype}{list(t.shape)}, expected float32{list(shape)}")
        if not np.isfinite(t).all():
            raise CheckpointError(f"adapter {name!r}: tensor {k} has non-finite values")
    if len(meta.get("labels", ())) != sizes["C"]:
        raise CheckpointError(f"adapter {name!r}: {len(meta.get('labels', ()))} labels for {sizes['C']} outputs")
    return tensors
