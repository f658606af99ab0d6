"""The shared-backbone runtime: one onnxruntime session on backbone.onnx, an AdapterBank, and an adapter
store (a folder `packs/` of `<name>.safetensors` + `<name>.json`) from which adapters load on first use.

`infer(input_ids, attention_mask, names)` runs ONE forward for a batch whose rows name different
adapters and returns logits per row (sliced to each adapter's labels) or a per-row error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from exporters.layout import LAYOUT_VERSION, Layout, needs

from ..names import NAME
from ..errors import CheckpointError
from .bank import AdapterBank, Pack


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
        from safetensors import SafetensorError
        from safetensors.numpy import load as load_bytes
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
        if meta.get("format") != "hpeft-pack" or meta.get("layout_version") != LAYOUT_VERSION:
            raise CheckpointError(f"adapter {name!r} is not an hpeft pack of layout version {LAYOUT_VERSION}")
        if meta.get("backbone", {}).get("sha256") != self.sha:
            raise CheckpointError(f"adapter {name!r} was exported for backbone "
                                  f"{meta.get('backbone', {}).get('name')!r}, not the one this graph serves")
        if meta.get("sha256") and hashlib.sha256(raw).hexdigest() != meta["sha256"]:
            raise PackUpdating(f"adapter {name!r} is being replaced; try again")
        try:
            tensors = load_bytes(raw)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"adapter {name!r}: not a readable safetensors file ({e})") from None
        version = meta.get("sha256") or hashlib.sha256(raw).hexdigest()
        return Pack(name, tensors, meta["sizes"], version[:16], tuple(meta.get("labels", ())), stamp)


def default_providers() -> list:
    """CUDA when onnxruntime-gpu sees a GPU, else CPU. TF32 is off: fp32 answers stay exact (1e-5)."""
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class SharedRuntime:
    def __init__(self, export_dir: Path, budget_bytes: int = 1 << 30, threads: int = 0, providers=None,
                 pinned: tuple[str, ...] = (), store: str | None = None):
        import onnxruntime as ort
        export_dir = Path(export_dir)
        info = json.loads((export_dir / "backbone.json").read_text())
        self.layout = Layout.from_dict(info["layout"])
        self.inputs = info["inputs"]
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        # no busy-waiting threads: the server, its stubs and the clients share the cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(export_dir / info["graph"]), so,
                                            providers=providers or default_providers())
        self.bank = AdapterBank(self.layout, info["backbone"]["num_layers"], budget_bytes, pinned)
        self.store = PackStore(store or export_dir / "packs", info["backbone"]["sha256"])

    def ensure(self, names: list[str]) -> dict[str, str]:
        """Load adapters not yet resident, reload those whose pack changed in the store (hot swap), drop
        those whose pack was deleted; returns name -> error for those that cannot be served."""
        errors = {}
        for n in dict.fromkeys(names):
            resident = self.bank.pack(n)
            if resident is not None and resident.stamp is not None and self.store.stamp(n) == resident.stamp:
                continue
            if resident is not None and self.store.stamp(n) is None:
                self.bank.remove(n)
                errors[n] = f"unknown adapter {n!r}: its pack was removed"
                continue
            try:
                pack = self.store.load(n)
                if not self.layout.covers(needs(pack.tensors, pack.sizes)):
                    raise CheckpointError(f"adapter {n!r} needs slots the deployed graph lacks: deploy its export "
                                          "again (hpeft deploy), which extends the graph")
                self.bank.put(pack)
            except PackUpdating:
                if resident is None:
                    errors[n] = f"adapter {n!r} is being written; try again"
            except CheckpointError as e:
                errors[n] = str(e)
        return errors

    def infer(self, input_ids: np.ndarray, attention_mask: np.ndarray, names: list[str]):
        """(logits per row or None, error per row or None); one forward for all rows that can run."""
        load_errors = self.ensure(names)
        ok = [r for r, n in enumerate(names) if n not in load_errors]
        out: list = [None] * len(names)
        errs: list = [load_errors.get(n) for n in names]
        if not ok:
            return out, errs
        sub = [names[r] for r in ok]
        with self.bank.reading(sub) as (index, arrays, bank_errs):
            feed = {"input_ids": input_ids[ok], "attention_mask": attention_mask[ok], "adapter_index": index}
            feed |= {n: arrays[n] for n in self.inputs if n in arrays}
            logits = self.session.run(["logits"], feed)[0]
            labels = {n: len(self.bank.labels(n)) for n in set(sub) if self.bank.version(n) is not None}
        for j, r in enumerate(ok):
            if bank_errs[j]:
                errs[r] = bank_errs[j]
            else:
                out[r] = logits[j, :labels[names[r]]]
        return out, errs
