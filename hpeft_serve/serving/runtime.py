"""The shared-backbone runtime: one onnxruntime session on backbone.onnx, an AdapterBank, and an adapter
store (a folder `packs/` of `<name>.safetensors` + `<name>.json`) from which adapters load on first use.

`infer(input_ids, attention_mask, names)` runs ONE forward for a batch whose rows name different
adapters and returns logits per row (sliced to each adapter's labels) or a per-row error.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..pack.check import check_slots
from ..pack.layout import Layout
from ..pack.store import PackStore, PackUpdating
from .bank import AdapterBank


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
        self.store = PackStore(store or export_dir / "packs", info)
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
