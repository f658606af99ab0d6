"""Validating a pack: its json and safetensors bytes against the served graph (its backbone.json) and the
slot layout, with json and safetensors only (nothing is unpickled). Every size is checked before any
tensor is read, and every malformed input is a CheckpointError naming the problem.

A pack's json says its task: classification (C >= 1 labels) or embedding (C = 0, labels [], with its
pooling and normalize, which its head flags must match); a json without a task is a classifier's (packs
written before embeddings). A pack may leave out any tensor that is all its fill (a compact pack, as
`hpeft export` writes them; layout.complete): it reads as that fill, so packs written whole before, and
those from before embeddings without head_max / head_norm, read as they always did."""

from __future__ import annotations

import json

import numpy as np

from ..errors import CheckpointError
from .layout import (EMBED_POOLINGS, FIXED, LAYOUT_VERSION, TASKS, Layout, complete, needs, resolve_shape,
                     size_keys, spec, symbols)

# a rank, bottleneck width, PHM width or rank, or prefix length above this many times the hidden size is
# refused (LoRA's full rank is d; the widest bottleneck of the presets is d/2)
MAX_SIZE_FACTOR = 8
MAX_LABELS = 1 << 16  # outputs of a classification head
MAX_LABEL_CHARS = 1024
MAX_HEADER = 100 << 20  # bytes of a safetensors header


class MissingSlots(CheckpointError):
    """A valid pack that needs slot kinds the deployed graph does not take."""


def check_slots(name: str, layout: Layout, tensors: dict, sizes: dict) -> Layout:
    """The slot kinds the pack needs (MissingSlots where `layout`, the graph's, lacks some)."""
    got = needs(tensors, sizes)
    if not layout.covers(got):
        raise MissingSlots(f"adapter {name!r} needs slots the deployed graph lacks: deploy its export with "
                           "`hpeft deploy`, which extends the graph")
    return got


def parse_json(data, what: str):
    """JSON text or bytes, or CheckpointError naming `what` (deep nesting and bad UTF-8 included)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise CheckpointError(f"{what} is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{what} is not valid JSON ({str(e)[:100]})") from None


def safetensors_header(raw: bytes) -> dict:
    """The JSON header of a safetensors file (read with json only), or CheckpointError."""
    if len(raw) < 8:
        raise CheckpointError("not a safetensors file (too short)")
    n = int.from_bytes(raw[:8], "little")
    if n <= 1 or n > min(len(raw) - 8, MAX_HEADER):
        raise CheckpointError("not a safetensors file (no valid header); a pickle or .bin file is never read")
    header = parse_json(raw[8:8 + n], "the safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError("not a safetensors file (its header is not a JSON object)")
    return header


def embedded_meta(header: dict) -> dict:
    """The pack json that `hpeft export` embeds in a pack's safetensors header (`__metadata__.hpeft_pack`),
    so that the .safetensors alone is an uploadable pack; CheckpointError if it is missing or malformed."""
    extra = header.get("__metadata__", {})
    if not isinstance(extra, dict):
        raise CheckpointError("the safetensors header's __metadata__ is not a JSON object")
    embedded = extra.get("hpeft_pack")
    if not embedded:
        raise CheckpointError("the file is a safetensors file but not an hpeft pack (no hpeft_pack metadata): "
                              "upload packs/<name>.safetensors from `hpeft export` (packs exported before "
                              "this release lack it: export again)")
    if not isinstance(embedded, str):
        raise CheckpointError("the pack's hpeft_pack metadata is not a string holding a JSON object")
    meta = parse_json(embedded, "the pack's hpeft_pack metadata")
    if not isinstance(meta, dict):
        raise CheckpointError("the pack's hpeft_pack metadata is not a JSON object")
    return meta


def graph_dims(graph: dict) -> dict:
    """L, d, f of the served graph (backbone.json "dims"; older graphs: the backbone's layers and hidden
    size, f None)."""
    dims = graph.get("dims")
    if isinstance(dims, dict) and all(type(dims.get(k)) is int for k in FIXED):
        return {k: dims[k] for k in FIXED}
    b = graph.get("backbone", {})
    return {"L": b.get("num_layers"), "d": b.get("hidden_size"), "f": None}


def _is_int(v) -> bool:
    return type(v) is int  # not bool, not float


def check_sizes(name: str, sizes, graph: dict, task: str = "classification") -> dict:
    """A pack's sizes: every key of the layout, each an int within its bound, L/d/f those of the graph, C
    labels (1 to MAX_LABELS for a classifier, 0 for an embedding adapter)."""
    if not isinstance(sizes, dict):
        raise CheckpointError(f"adapter {name!r}: its json's sizes are not a JSON object")
    keys = size_keys()
    missing, extra = [k for k in keys if k not in sizes], sorted(set(sizes) - set(keys))[:4]
    if missing or extra:
        raise CheckpointError(f"adapter {name!r}: its sizes lack {missing[:4]} or name unknown sizes {extra}")
    bad = [k for k in keys if not _is_int(sizes[k]) or sizes[k] < 0]
    if bad:
        raise CheckpointError(f"adapter {name!r}: size {bad[0]} is {sizes[bad[0]]!r}, not a non-negative integer")
    dims, layout = graph_dims(graph), Layout.from_dict(graph["layout"])
    for k, what in (("L", "layers"), ("d", "hidden size"), ("f", "FFN width")):
        if dims[k] is None and any(k in symbols(n) for n in layout.names()):
            raise CheckpointError(f"adapter {name!r}: the served graph's backbone.json records no {what} to "
                                  "check it against (it predates recorded dims): re-export the graph with "
                                  "`hpeft export` and deploy it again")
        if dims[k] is not None and sizes[k] != dims[k]:
            raise CheckpointError(f"adapter {name!r} is laid out for {what} {k}={sizes[k]}; the served graph "
                                  f"has {k}={dims[k]}: export it for this backbone")
    d = sizes["d"]
    if not 1 <= sizes["n"] <= d or d % sizes["n"]:
        raise CheckpointError(f"adapter {name!r}: PHM n={sizes['n']} does not divide the hidden size {d}")
    bound = MAX_SIZE_FACTOR * d
    over = [k for k in keys if k not in FIXED + ("n", "C") and sizes[k] > bound]
    if over:
        raise CheckpointError(f"adapter {name!r}: size {over[0]}={sizes[over[0]]} is over the bound "
                              f"{MAX_SIZE_FACTOR} x hidden size = {bound}")
    if task == "embedding" and sizes["C"] != 0:
        raise CheckpointError(f"adapter {name!r} is an embedding adapter with {sizes['C']} outputs (labels): "
                              "an embedding pack has C = 0")
    if task != "embedding" and not 1 <= sizes["C"] <= MAX_LABELS:
        raise CheckpointError(f"adapter {name!r}: it has {sizes['C']} outputs (labels); 1 to {MAX_LABELS} are served"
                              + (" (0 only for an embedding pack, whose json says task embedding)" if not sizes["C"] else ""))
    return sizes


def check_task(name: str, meta: dict) -> str:
    """The pack's task (json "task"; none: classification), and for an embedding pack its pooling and
    normalize."""
    task = meta.get("task", "classification")
    if task not in TASKS:
        raise CheckpointError(f"adapter {name!r}: its json's task {str(task)[:40]!r} is not one of {', '.join(TASKS)}")
    if task == "embedding":
        if meta.get("pooling") not in EMBED_POOLINGS:
            raise CheckpointError(f"adapter {name!r}: an embedding pack's pooling {str(meta.get('pooling'))[:40]!r} "
                                  f"is not one of {', '.join(EMBED_POOLINGS)}")
        if type(meta.get("normalize")) is not bool:
            raise CheckpointError(f"adapter {name!r}: an embedding pack's normalize is "
                                  f"{str(meta.get('normalize'))[:40]!r}, not true or false")
    return task


def check_meta(name: str, meta, graph: dict) -> dict:
    """A pack's json against the served graph: format, version, backbone, sizes, labels. Returns the sizes."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"adapter {name!r}: its json is not a JSON object")
    version = meta.get("layout_version")
    if meta.get("format") != "hpeft-pack" or not _is_int(version) or version != LAYOUT_VERSION:
        raise CheckpointError(f"adapter {name!r} is not an hpeft pack of layout version {LAYOUT_VERSION}: "
                              "export it with `hpeft export` (without --merge)")
    backbone = meta.get("backbone")
    if not isinstance(backbone, dict):
        raise CheckpointError(f"adapter {name!r}: its json's backbone is not a JSON object")
    if backbone.get("sha256") != graph["backbone"]["sha256"]:
        raise CheckpointError(f"adapter {name!r} was exported for backbone {str(backbone.get('name'))[:100]!r}, "
                              "not the one this graph serves")
    for k in ("sha256", "method", "name"):
        if k in meta and not isinstance(meta[k], str):
            raise CheckpointError(f"adapter {name!r}: its json's {k} is not a string")
    sizes = check_sizes(name, meta.get("sizes"), graph, check_task(name, meta))
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) != sizes["C"]:
        got = f"{len(labels)} labels" if isinstance(labels, list) else f"labels {str(labels)[:40]}"
        raise CheckpointError(f"adapter {name!r}: {got} for {sizes['C']} outputs (give a list of {sizes['C']} strings)")
    for label in labels:
        if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS or not _utf8(label):
            raise CheckpointError(f"adapter {name!r}: label {repr(label)[:40]} is not a string of at most "
                                  f"{MAX_LABEL_CHARS} characters (valid UTF-8)")
    return sizes


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate
        return False


def check_header(name: str, header: dict, sizes: dict) -> None:
    """The tensors a safetensors header declares: the layout's (any may be left out: it is its fill),
    float32, of the shapes the sizes give (checked before any tensor is read)."""
    declared = {k: v for k, v in header.items() if k != "__metadata__"}
    extra = sorted(set(declared) - set(spec()))
    if extra:
        raise CheckpointError(f"adapter {name!r}: tensors do not match the pack layout "
                              f"(unexpected {[str(k)[:40] for k in extra[:4]]})")
    want = {k: v for k, v in spec().items() if k in declared}
    for k, syms in want.items():
        entry, shape = declared[k], list(resolve_shape(syms, sizes))
        got = entry.get("shape") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype != "F32" or got != shape:
            raise CheckpointError(f"adapter {name!r}: tensor {k} is {str(dtype)[:10]}{str(got)[:40]}, "
                                  f"expected F32{shape}")


def check_shapes(name: str, tensors: dict, sizes: dict) -> None:
    """Loaded tensors (numpy or torch) of the shapes their pack's sizes give: what a bank checks before
    it changes anything."""
    for k, syms in spec().items():
        t = tensors.get(k)
        if t is None or tuple(t.shape) != resolve_shape(syms, sizes):
            raise CheckpointError(f"adapter {name!r}: tensor {k} is missing or not of shape "
                                  f"{list(resolve_shape(syms, sizes))}")


def check_pack(name: str, meta, raw: bytes, graph: dict) -> dict[str, np.ndarray]:
    """Validate a pack (its json `meta` and safetensors bytes `raw`) against the served graph (`graph`: its
    backbone.json) and the layout: every size, then every tensor present, float32, of the shape its sizes
    give, finite. Returns the tensors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_bytes
    sizes = check_meta(name, meta, graph)
    check_header(name, safetensors_header(raw), sizes)
    try:
        tensors = load_bytes(raw)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"adapter {name!r}: not a readable safetensors file ({str(e)[:200]})") from None
    for k, t in tensors.items():
        if not np.isfinite(t).all():
            raise CheckpointError(f"adapter {name!r}: tensor {k} has non-finite values")
    tensors = complete(tensors, sizes)
    check_head_flags(name, tensors, meta)
    return tensors


def check_head_flags(name: str, tensors: dict, meta: dict) -> None:
    """head_cls, head_max, head_norm are 0/1 and say what the json says: an embedding pack's pooling and
    normalize; a classifier is neither max-pooled nor normalised."""
    embedding = meta.get("task") == "embedding"
    pooling = meta.get("pooling") if embedding else None
    want = {"head_max": pooling == "max", "head_norm": bool(embedding and meta.get("normalize"))}
    if embedding:
        want["head_cls"] = pooling == "cls"
    for k in ("head_cls", "head_max", "head_norm"):
        v = float(tensors[k])
        if v not in (0.0, 1.0):
            raise CheckpointError(f"adapter {name!r}: head flag {k} is {v}, not 0 or 1")
        if k in want and v != float(want[k]):
            what = f"embedding, pooling {pooling}, normalize {meta.get('normalize')}" if embedding else "classification"
            raise CheckpointError(f"adapter {name!r}: head flag {k} is {v}, but its json says {what}")
