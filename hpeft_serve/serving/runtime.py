"""The shared-backbone runtime: one onnxruntime session on backbone.onnx, an AdapterBank, and an adapter
store (a folder `packs/` of `<name>.safetensors` + `<name>.json`) from which adapters load on first use.

`infer(input_ids, attention_mask, names)` runs ONE forward for a batch whose rows name different
adapters and returns logits per row (sliced to each adapter's labels) or a per-row error.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from exporters.layout import LAYOUT_VERSION, Layout, needs, resolve_shape, spec

from ..names import NAME, check_name
from ..errors import CheckpointError
from .bank import AdapterBank, Pack


SIZE_KEYS = ("L", "d", "f", "P", "n", "C", "r")


class MissingSlots(CheckpointError):
    """A valid pack that needs slot kinds the deployed graph does not take."""


def check_slots(name: str, layout: Layout, tensors: dict, sizes: dict) -> None:
    if not layout.covers(needs(tensors, sizes)):
        raise MissingSlots(f"adapter {name!r} needs slots the deployed graph lacks: deploy its export with "
                           "`hpeft deploy`, which extends the graph")


class PackUpdating(CheckpointError):
    """A pack's files are being replaced (its json does not match its tensors yet): try again shortly."""


class PackStore:
    """Adapter packs (`<name>.safetensors` + `<name>.json`) in a folder or at any fsspec URL (s3://, gs://,
    memory://, ... with the matching fsspec package installed); validated against the graph's backbone
    and layout version."""

    def __init__(self, location, backbone_sha256: str):
        self.location, self.sha = str(location), backbone_sha256
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
        tensors = check_pack(name, meta, raw, self.sha)
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


def check_pack(name: str, meta: dict, raw: bytes, backbone_sha256: str) -> dict[str, np.ndarray]:
    """Validate a pack (its json `meta` and safetensors bytes `raw`) against the served backbone and the
    layout: every tensor present, float32, finite, of the shape its sizes give. Returns the tensors."""
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


def default_providers() -> list:
    """CUDA when onnxruntime-gpu sees a GPU, else CPU. TF32 is off: fp32 answers stay exact (1e-5)."""
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class SharedRuntime:
    def __init__(self, export_dir: Path, budget_bytes: int = 1 << 30, threads: int = 0, providers=None,
                 pinned: tuple[str, ...] = (), store: str | None = None, check_every_s: float | None = None,
                 bind_bank: bool | None = None):
        import onnxruntime as ort
        export_dir = Path(export_dir)
        info = json.loads((export_dir / "backbone.json").read_text())
        self.layout = Layout.from_dict(info["layout"])
        self.inputs = info["inputs"]
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        # onnxruntime's default spinning threads: turning them off cost ~2 ms a request at batch 1 on MiniLM
        self.session = ort.InferenceSession(str(export_dir / info["graph"]), so,
                                            providers=providers or default_providers())
        self.bank = AdapterBank(self.layout, info["backbone"]["num_layers"], budget_bytes, pinned)
        # on a GPU the bank lives on the device and is copied there only when it changes, not on every forward
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.bind_bank = self.device == "cuda" if bind_bank is None else bind_bank
        self._bound: dict[str, tuple[int, object]] = {}  # graph input -> (bank generation, OrtValue)
        self._bound_lock = threading.Lock()
        self.store = PackStore(store or export_dir / "packs", info["backbone"]["sha256"])
        # how often a resident adapter's pack is checked for a replacement: on every request for a local
        # folder (a stat), at most once a second for a remote store (two HEAD requests per check)
        self.check_every_s = check_every_s if check_every_s is not None else (0.0 if self.store.fs is None else 1.0)
        self._checked: dict[str, float] = {}

    def ensure(self, names: list[str]) -> dict[str, str]:
        """Load adapters not yet resident, reload those whose pack changed in the store (hot swap), drop
        those whose pack was deleted; returns name -> error for those that cannot be served."""
        errors = {}
        now = time.monotonic()
        for n in dict.fromkeys(names):
            resident = self.bank.pack(n)
            if resident is not None and self.check_every_s and now - self._checked.get(n, -1e9) < self.check_every_s:
                continue
            self._checked[n] = now
            stamp = self.store.stamp(n) if resident is not None else None
            if resident is not None and resident.stamp is not None and stamp == resident.stamp:
                continue
            if resident is not None and stamp is None:
                self.bank.remove(n)
                errors[n] = f"unknown adapter {n!r}: its pack was removed"
                continue
            try:
                pack = self.store.load(n)
                check_slots(n, self.layout, pack.tensors, pack.sizes)
                self.bank.put(pack)
            except PackUpdating:
                if resident is None:
                    errors[n] = f"adapter {n!r} is being written; try again"
            except CheckpointError as e:
                errors[n] = str(e)
        return errors

    def _run_bound(self, feed: dict, bank: dict) -> np.ndarray:
        """One forward with the bank's tensors bound as device OrtValues, refreshed when the bank's generation
        changed (called under the bank's read lock: no write can change it meanwhile)."""
        import onnxruntime as ort
        binding = self.session.io_binding()
        for n, a in feed.items():
            binding.bind_cpu_input(n, np.ascontiguousarray(a))
        generation = self.bank.generation
        with self._bound_lock:
            for n, a in bank.items():
                hit = self._bound.get(n)
                if hit is None or hit[0] != generation:
                    # a snapshot: a device copy on the GPU; on the CPU an explicit copy (an OrtValue would share
                    # the bank's memory), so that the CPU runs what the GPU runs
                    snap = np.array(a) if self.device == "cpu" else a
                    hit = (generation, ort.OrtValue.ortvalue_from_numpy(snap, self.device, 0))
                    self._bound[n] = hit
                binding.bind_ortvalue_input(n, hit[1])
        binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def infer(self, input_ids: np.ndarray, attention_mask: np.ndarray, names: list[str]):
        """(logits per row or None, error per row or None, version per row or None): one forward for all
        rows that can run; a row's version is that of the weights that computed it."""
        load_errors = self.ensure(names)
        ok = [r for r, n in enumerate(names) if n not in load_errors]
        out: list = [None] * len(names)
        errs: list = [load_errors.get(n) for n in names]
        versions: list = [None] * len(names)
        if not ok:
            return out, errs, versions
        sub = [names[r] for r in ok]
        with self.bank.reading(sub) as (index, arrays, bank_errs):
            feed = {"input_ids": input_ids[ok], "attention_mask": attention_mask[ok], "adapter_index": index}
            bank = {n: arrays[n] for n in self.inputs if n in arrays}
            logits = self._run_bound(feed, bank) if self.bind_bank else self.session.run(["logits"], feed | bank)[0]
            resident = {n: (self.bank.version(n), len(self.bank.labels(n))) for n in set(sub)
                        if self.bank.version(n) is not None}
        for j, r in enumerate(ok):
            if bank_errs[j]:
                errs[r] = bank_errs[j]
            else:
                versions[r], width = resident[names[r]]
                out[r] = logits[j, :width]
        return out, errs, versions
