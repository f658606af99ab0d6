"""The adapter store: packs (`<name>.safetensors` + `<name>.json`) in a folder or at any fsspec URL."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..names import NAME, check_name
from .check import check_pack


@dataclass(frozen=True)
class Pack:
    """One adapter in the shared layout: tensors (numpy, no K axis), its sizes, a version string."""

    name: str
    tensors: dict[str, np.ndarray]
    sizes: dict[str, int]
    version: str
    labels: tuple[str, ...] = ()
    stamp: tuple | None = None  # the store files' (mtime, size) when read: a change means a new version


class PackUpdating(CheckpointError):
    """A pack's files are being replaced (its json does not match its tensors yet): try again shortly."""


class PackStore:
    """Adapter packs (`<name>.safetensors` + `<name>.json`) in a folder or at any fsspec URL (s3://, gs://,
    memory://, ... with the matching fsspec package installed); validated against the graph's backbone
    and layout version."""

    def __init__(self, location, graph: dict | None = None):
        """`graph`: the served graph's backbone.json, which packs are checked against on load (None: a store
        that is only written to, as `hpeft export` does)."""
        self.location, self.graph = str(location), graph
        if "://" in self.location:
            import fsspec
            self.fs, self.root = fsspec.core.url_to_fs(self.location)
        else:
            self.fs, self.root = None, self.location

    def _path(self, name: str, suffix: str) -> str:
        return f"{self.root.rstrip('/')}/{name}{suffix}"

    def _read(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes() if self.fs is None else self.fs.cat_file(path)
        except (OSError, FileNotFoundError):
            return None

    def _stat(self, path: str) -> tuple | None:
        try:
            if self.fs is None:
                st = Path(path).stat()
                return st.st_mtime_ns, st.st_size
            info = self.fs.info(path)
        except (OSError, FileNotFoundError):
            return None
        return (info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created"),
                info.get("size"))

    def names(self) -> list[str]:
        if self.fs is None:
            return sorted(p.stem for p in Path(self.root).glob("*.json"))
        return sorted(Path(p).stem for p in self.fs.glob(self._path("*", ".json")))

    def stamp(self, name: str) -> tuple | None:
        """What changes when a pack is replaced (None: the pack is gone)."""
        a, b = self._stat(self._path(name, ".json")), self._stat(self._path(name, ".safetensors"))
        return None if a is None or b is None else a + b

    def load(self, name: str) -> Pack:
        if not NAME.fullmatch(name or ""):
            raise CheckpointError(f"adapter name {name!r} is invalid")
        stamp = self.stamp(name)
        meta_raw, raw = self._read(self._path(name, ".json")), self._read(self._path(name, ".safetensors"))
        if meta_raw is None or raw is None:
            raise CheckpointError(f"unknown adapter {name!r}: no pack {name}.json/.safetensors in {self.location}")
        try:
            meta = json.loads(meta_raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"adapter {name!r}: its json is not valid ({e})") from None
        if meta.get("sha256") and hashlib.sha256(raw).hexdigest() != meta["sha256"]:
            raise PackUpdating(f"adapter {name!r} is being replaced; try again")
        tensors = check_pack(name, meta, raw, self.graph)
        version = meta.get("sha256") or hashlib.sha256(raw).hexdigest()
        return Pack(name, tensors, meta["sizes"], version[:16], tuple(meta.get("labels", ())), stamp)

    def meta(self, name: str) -> dict | None:
        raw = self._read(self._path(name, ".json"))
        try:
            return None if raw is None else json.loads(raw)
        except json.JSONDecodeError:
            return None

    def size(self, name: str) -> int | None:
        st = self._stat(self._path(name, ".safetensors"))
        return None if st is None else st[1]

    def write(self, name: str, raw: bytes, meta: dict) -> None:
        """Tensors first, then the json that names their sha256 (a reader that sees a json whose sha256 does
        not match yet waits: PackUpdating); each file written whole (temp name + rename, or one object put)."""
        check_name(name)
        payloads = ((".safetensors", raw), (".json", (json.dumps(meta, indent=2) + "\n").encode()))
        for suffix, data in payloads:
            path = self._path(name, suffix)
            if self.fs is None:
                Path(self.root).mkdir(parents=True, exist_ok=True)
                tmp = Path(self._path(f".{name}", suffix + ".tmp"))
                tmp.write_bytes(data)
                tmp.chmod(0o644)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)

    def delete(self, name: str) -> bool:
        """Remove a pack (its json first: a reader then sees the adapter gone, not half of it)."""
        check_name(name)
        found = False
        for suffix in (".json", ".safetensors"):
            path = self._path(name, suffix)
            try:
                if self.fs is None:
                    Path(path).unlink()
                else:
                    self.fs.rm_file(path)
                found = True
            except (OSError, FileNotFoundError):
                pass
        return found
