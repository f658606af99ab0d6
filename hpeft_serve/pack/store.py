"""The adapter store: packs (`<name>.safetensors` + `<name>.json`) in a folder or at any fsspec URL.

Writes of one name are serialized (an in-process lock, and for a local folder an flock on `.<name>.lock`,
which also holds between processes and is removed when the write is done); each file goes to a temp file
of its own and is renamed into place, the tensors before the json that names their sha256: at rest a
json always matches its tensors, and a reader that catches a write half done sees PackUpdating. An fsspec store has no lock between processes (object
stores offer none): two processes writing one name at once can leave a json that names the other's
tensors, which readers see as PackUpdating until the next write of that name; write through one process.
`packs_layout` / `served_layout`: the slot kinds a folder's packs need, for re-exporting an older graph.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..names import NAME, check_name
from .check import check_head_flags, check_header, check_meta, check_pack, parse_json, safetensors_header
from .layout import FILL, LAYOUT_VERSION, Layout, needs

HEAD_FLAGS = ("head_cls", "head_max", "head_norm")
assert not set(HEAD_FLAGS) & set(FILL)  # their fill (what a compact pack leaving them out means) is 0

_NAME_LOCKS = [threading.Lock() for _ in range(64)]  # in-process, striped by (store, name): bounded


def _lock_file(path: str) -> int:
    """An flock held on `path` (created): retried when the file was unlinked by its previous holder while
    this process waited on it (the lock is then on a file no one else will open)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            held, now = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@dataclass(frozen=True)
class Pack:
    """One adapter in the shared layout: tensors (numpy, no K axis), its sizes, a version string, and its
    task: classification (answers logits over `labels`) or embedding (answers its embedding)."""

    name: str
    tensors: dict[str, np.ndarray]
    sizes: dict[str, int]
    version: str
    labels: tuple[str, ...] = ()
    stamp: tuple | None = None  # the store files' (mtime, size) when read: a change means a new version
    task: str = "classification"
    sha256: str | None = None  # of the tensors file, checked against its json when read
    # True: `tensors` may leave out any tensor that is all its fill (layout.compact), as the pack file does;
    # a bank writes the tensors present and fills the rest of the slot, without building them
    compact: bool = False
    # the slot kinds it uses (pack.layout.needs), set by the bank that holds it: which shared graphs can run
    # its rows (serving/graphs.py)
    needs: object = None


class PackUpdating(CheckpointError):
    """A pack's files are being replaced (its json does not match its tensors yet): try again shortly."""


class PackUnreadable(CheckpointError):
    """A pack's files exist but cannot be read (a directory in their place, permissions, a store error)."""


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
        """The file's bytes; None if it does not exist; PackUnreadable if it exists but cannot be read."""
        try:
            return Path(path).read_bytes() if self.fs is None else self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except OSError as e:  # a directory in its place, permissions, a remote store's error
            raise PackUnreadable(f"adapter {Path(path).stem!r}: its pack file exists but cannot be read "
                                 f"({type(e).__name__})") from None

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

    def verify(self, name: str) -> tuple | None:
        """(stamp, sha256) of the pack's tensors file, read while its files' stamp held (before and after):
        what `load(verified=...)` takes to skip hashing it again (a watcher hashes packs ahead of their first
        load this way). None if the pack is gone, unreadable or changed meanwhile. A local store only."""
        if self.fs is not None or not NAME.fullmatch(name or ""):
            return None
        stamp = self.stamp(name)
        try:
            raw = self._read(self._path(name, ".safetensors"))
        except PackUnreadable:
            return None
        if stamp is None or raw is None or self.stamp(name) != stamp:
            return None
        return stamp, hashlib.sha256(raw).hexdigest()

    def load(self, name: str, verified: tuple | None = None, whole: bool = True) -> Pack:
        """The pack `name`, checked. `verified`: (stamp, sha256) of an earlier load of it (or of `verify`);
        while its files' stamp is still that one (before and after reading) and its json names that sha256,
        the tensors are not hashed again (a local store: a replacement changes the stamp). `whole` False:
        the tensors as the file holds them (a compact pack: `Pack.compact`), for a bank to place; True:
        every layout tensor (layout.complete)."""
        if not NAME.fullmatch(name or ""):
            raise CheckpointError(f"adapter name {name!r} is invalid")
        stamp = self.stamp(name)
        meta_raw, raw = self._read(self._path(name, ".json")), self._read(self._path(name, ".safetensors"))
        if meta_raw is None or raw is None:
            raise CheckpointError(f"unknown adapter {name!r}: no pack {name}.json/.safetensors in {self.location}")
        meta = parse_json(meta_raw, f"adapter {name!r}: its json")
        if not isinstance(meta, dict):
            raise CheckpointError(f"adapter {name!r}: its json is not a JSON object")
        known = (verified is not None and self.fs is None and stamp is not None and verified[0] == stamp
                 and meta.get("sha256") == verified[1] and self.stamp(name) == stamp)
        digest = verified[1] if known else hashlib.sha256(raw).hexdigest()
        if meta.get("sha256") and digest != meta["sha256"]:
            raise PackUpdating(f"adapter {name!r} is being replaced; try again")
        if self.graph is None:
            raise ValueError("this PackStore was opened without the served graph: it cannot check packs")
        tensors = check_pack(name, meta, raw, self.graph) if whole else _check_compact(name, meta, raw, self.graph)
        version = meta.get("sha256") or digest
        return Pack(name, tensors, meta["sizes"], version[:16], tuple(meta.get("labels", ())), stamp,
                    meta.get("task", "classification"), digest, not whole)

    def meta(self, name: str) -> dict | None:
        try:
            raw = self._read(self._path(name, ".json"))
            meta = None if raw is None else parse_json(raw, "json")
        except CheckpointError:  # unreadable or not JSON: no metadata to show
            return None
        return meta if isinstance(meta, dict) else None

    def watch(self) -> "FolderWatch | None":
        """A FolderWatch on a local store's folder; None for a remote store, a folder not there (yet), or
        where inotify is not available."""
        if self.fs is not None:
            return None
        try:
            return FolderWatch(self.root)
        except OSError:
            return None

    def size(self, name: str) -> int | None:
        st = self._stat(self._path(name, ".safetensors"))
        return None if st is None else st[1]

    @contextmanager
    def _locked(self, name: str):
        """Writes of `name` one at a time: in this process, and between processes for a local folder."""
        with _NAME_LOCKS[zlib.crc32(f"{self.location}\0{name}".encode()) % len(_NAME_LOCKS)]:
            if self.fs is not None:
                yield
                return
            Path(self.root).mkdir(parents=True, exist_ok=True)
            fd = _lock_file(self._path(f".{name}", ".lock"))
            try:
                yield
            finally:
                os.unlink(self._path(f".{name}", ".lock"))  # nothing left at rest; a waiter on it retries
                os.close(fd)  # releases the flock

    def _put_file(self, path: str, data: bytes) -> None:
        """One file written whole: a temp file of its own in the same folder, renamed into place."""
        if self.fs is not None:
            self.fs.pipe_file(path, data)
            return
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{Path(path).name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write(self, name: str, raw: bytes, meta: dict) -> None:
        """Tensors first, then the json, which records their sha256 (set here): a reader that sees a json
        whose sha256 does not match yet gets PackUpdating."""
        check_name(name)
        meta = {**meta, "sha256": hashlib.sha256(raw).hexdigest()}
        with self._locked(name):
            self._put_file(self._path(name, ".safetensors"), raw)
            self._put_file(self._path(name, ".json"), (json.dumps(meta, indent=2) + "\n").encode())

    def delete(self, name: str) -> bool:
        """Remove a pack (its json first: a reader then sees the adapter gone, not half of it)."""
        check_name(name)
        with self._locked(name):
            return self._delete(name)

    def _delete(self, name: str) -> bool:
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


def folder_stamp(folder) -> tuple | None:
    """What changes when an entry is added, replaced or removed in a local folder (a rename in it changes the
    folder's mtime): (mtime_ns, inode), or None when it cannot be read."""
    try:
        st = Path(folder).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


class FolderWatch:
    """The packs whose files changed in a local folder (Linux inotify): `changed()` gives the names whose
    `.json` or `.safetensors` was written, renamed into place, renamed away or deleted since the last call,
    or None when that is not known (the kernel's queue overflowed, the folder was moved or deleted): then
    list the folder. OSError from the constructor where inotify is not available."""

    _WRITTEN, _FROM, _TO, _CREATE, _DELETE = 0x8, 0x40, 0x80, 0x100, 0x200
    _SELF, _OVERFLOW, _IGNORED = 0x400 | 0x800, 0x4000, 0x8000
    _NONBLOCK, _CLOEXEC = 0o4000, 0o2000000

    def __init__(self, folder):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols (libc's): no library search
        if not hasattr(libc, "inotify_init1"):
            raise OSError("no inotify on this system")
        self.fd = libc.inotify_init1(self._NONBLOCK | self._CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        mask = self._WRITTEN | self._FROM | self._TO | self._CREATE | self._DELETE | self._SELF
        if libc.inotify_add_watch(self.fd, os.fsencode(str(folder)), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"cannot watch {folder}")
        self.lost = False

    def changed(self) -> set[str] | None:
        names: set[str] = set()
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            at = 0
            while at + 16 <= len(buf):
                mask, size = int.from_bytes(buf[at + 4:at + 8], "little"), int.from_bytes(buf[at + 12:at + 16], "little")
                name = buf[at + 16:at + 16 + size].rstrip(b"\0").decode("utf-8", "replace")
                at += 16 + size
                if mask & (self._OVERFLOW | self._IGNORED | self._SELF):  # what changed is not known
                    self.lost = self.lost or bool(mask & (self._IGNORED | self._SELF))  # no watch any more
                    names = None
                    continue
                if names is not None and not name.startswith("."):
                    for suffix in (".json", ".safetensors"):
                        if name.endswith(suffix) and len(name) > len(suffix):
                            names.add(name[:-len(suffix)])
        return names

    def close(self) -> None:
        os.close(self.fd)


def _check_compact(name: str, meta, raw: bytes, graph: dict) -> dict[str, np.ndarray]:
    """check_pack's checks (every size, then every tensor present: float32, of its shape, finite; the head
    flags against the json), returning the tensors the file holds: the ones it leaves out are their fill,
    which the bank writes without building them (check_pack gives them back whole: layout.complete)."""
    sizes = check_meta(name, meta, graph)
    header = safetensors_header(raw)
    check_header(name, header, sizes)
    tensors = _views(name, header, raw)
    for k, t in tensors.items():
        if not np.isfinite(t).all():
            raise CheckpointError(f"adapter {name!r}: tensor {k} has non-finite values")
    zero = np.zeros((), np.float32)  # the fill of a head flag a compact pack leaves out
    check_head_flags(name, {k: tensors.get(k, zero) for k in HEAD_FLAGS}, meta)
    return tensors


def _views(name: str, header: dict, raw: bytes) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file whose header check_header passed (float32, shapes of the layout),
    as read-only views into `raw` (no copy: a bank copies them into its slot). The byte ranges are checked
    as the safetensors library checks them: each in the data, of its tensor's size, together covering the
    data exactly, without overlap."""
    start = 8 + int.from_bytes(raw[:8], "little")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    spans = []
    for k, v in entries.items():
        off = v.get("data_offsets")
        if (not isinstance(off, list) or len(off) != 2 or not all(type(x) is int for x in off)
                or not 0 <= off[0] <= off[1] or off[1] - off[0] != 4 * int(np.prod(v["shape"], dtype=np.int64))):
            raise CheckpointError(f"adapter {name!r}: not a readable safetensors file (tensor {k} has invalid "
                                  "data offsets)")
        spans.append((off[0], off[1], k))
    end = 0
    for b, e, k in sorted(spans):
        if b != end:
            raise CheckpointError(f"adapter {name!r}: not a readable safetensors file (tensor {k}'s data "
                                  "overlaps another's or leaves a gap)")
        end = e
    if start + end != len(raw):
        raise CheckpointError(f"adapter {name!r}: not a readable safetensors file (its data is "
                              f"{len(raw) - start} bytes, its header names {end})")
    return {k: np.frombuffer(raw, "<f4", (e - b) // 4, start + b).reshape(entries[k]["shape"])
            for b, e, k in spans}


def pack_needs(folder) -> list[Layout]:
    """The slot kinds each pack in a local folder needs (its `needs`), read without a graph to check them
    against. Packs that cannot be read are skipped (they cannot be served either)."""
    from safetensors.numpy import load_file
    out = []
    for meta_f in sorted(Path(folder).glob("*.json")):
        try:
            sizes = json.loads(meta_f.read_text())["sizes"]
            out.append(needs(load_file(str(meta_f.with_suffix(".safetensors"))), sizes))
        except Exception:  # noqa: BLE001
            continue
    return out


def packs_layout(folder) -> Layout:
    """The slot kinds the packs in a local folder need together (the union of their `needs`): what
    re-exports a graph recorded before PHM slots were per n."""
    out = Layout()
    for got in pack_needs(folder):
        out = out.union(got)
    return out


def served_layout(info: dict, packs) -> Layout:
    """The slot kinds a graph (its backbone.json `info`) must keep serving: its layout, or for a graph of
    another layout version or from before PHM slots per n, what the packs in `packs` need."""
    if info.get("layout_version") == LAYOUT_VERSION and "layout" in info:
        try:
            return Layout.from_dict(info["layout"])
        except CheckpointError:  # PHM sites without phm_n: keep its other slots, take PHM from its packs
            old = info["layout"]
            gated = [g for g in old.get("gated", []) if not g.startswith("phm")]
            kept = Layout.from_dict({**old, "phm": [], "gated": gated})
            return kept.union(packs_layout(packs))
    return packs_layout(packs)


def predates_phm_n(info: dict) -> bool:
    """A graph (backbone.json `info`) exported before PHM slots were per n: its file cannot serve a bank of
    this release, so it is re-exported, never reused."""
    layout = info.get("layout", {})
    return isinstance(layout, dict) and bool(layout.get("phm")) and "phm_n" not in layout
