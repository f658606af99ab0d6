"""The shared-backbone runtime: one onnxruntime session on backbone.onnx, an AdapterBank, and an adapter
store (a folder `packs/` of `<name>.safetensors` + `<name>.json`) from which adapters load on first use.

`infer(input_ids, attention_mask, names)` runs ONE forward for a batch whose rows name different
adapters, classifiers and embedding adapters mixed, and returns per row its answer (a classifier's logits
sliced to its labels, an embedding adapter's embedding) or an error (a `RowError`: a str with its
`codes.Code`); `.tasks` says which kind each answer is and `.embeddings` holds every row's `embeddings`
output (a classifier's pooled sentence vector). The reserved name "@backbone" is the plain backbone as an
embedder (pooled and normalised as backbone.json's "embedding" says). Should that forward raise, the batch runs again split by adapter, so that only
the rows of the adapter whose forward fails get an error. Messages name the problem, never the store's
location or a stack frame (those go to the server log).

Preloading (`preload_every_s`): a background thread watches the store (a local folder with inotify: each
pass looks only at the packs written or removed since the last, whatever the number in the store; else a
stat of the folder, and a listing when it changed) and loads every pack registered or replaced there into the bank while the bank has room under its budget (it never evicts), so a request naming a
newly uploaded adapter finds it resident: on the request path its first use is a lookup. Loads on the
request path remain for what the preloader has not reached (a miss under the budget, a replacement the
next request names before the watcher saw it): they take the same lock, one pack at a time, so a request
waits at most for the one pack being loaded. A pack verified once (sha256 against its json) and evicted
is not hashed again while its files' stamp is unchanged; once the bank is full, the watcher hashes the
packs that are not resident ahead of their first use (`verify_ahead`, a quarter of a core at most), so
that an LRU miss on the request path only reads its files, checks them and writes its slot: the pack
stays compact (the tensors its file holds, as views of its bytes) and the bank fills the rest of the
slot, without building the union's tensors (about 1 ms for a MiniLM LoRA pack).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..names import NAME
from ..pack.check import MissingSlots
from ..pack.layout import BACKBONE, Layout, backbone_pack
from ..pack.store import Pack, PackStore, PackUnreadable, PackUpdating, folder_stamp
from .bank import AdapterBank
from .batching import Limits, position_limit
from .codes import Code
from .graphs import SignatureGraphs

# a pack whose json's sha256 still does not match its tensors after this long (same files) is damaged, not
# being replaced: a writer replaces the tensors, then the json, within moments
SETTLE_S = 3.0
# at most this many adapter names remembered as damaged or being replaced (bounded: names come from clients)
MAX_PENDING = 1024


class RowError(str):
    """A row's error: the message, with its code (`.code`)."""

    code: Code

    def __new__(cls, code: Code, message: str):
        self = super().__new__(cls, message)
        self.code = code
        return self


class Answers(tuple):
    """(answers, errors, versions) per row, as a 3-tuple, with `tasks` (per row "classification": its answer
    is its logits; "embedding": its embedding; None for a row in error) and `embeddings` (per row the graph's
    embeddings output: an embedding row's embedding, a classifier row's pooled vector; None without one)."""

    tasks: list
    embeddings: list

    def __new__(cls, out: list, errors: list, versions: list, tasks: list, embeddings: list):
        self = super().__new__(cls, (out, errors, versions))
        self.tasks, self.embeddings = tasks, embeddings
        return self


def show(name: str) -> str:
    """An adapter name as error messages quote it (a client's name can be anything, of any length)."""
    return repr(name if len(name) <= 64 else name[:64] + "...")


def default_providers() -> list:
    """CUDA when onnxruntime-gpu sees a GPU, else CPU. TF32 is off: fp32 answers stay exact (1e-5)."""
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class SharedRuntime:
    def __init__(self, export_dir: Path, budget_bytes: int = 1 << 30, threads: int = 0, providers=None,
                 pinned: tuple[str, ...] = (), store: str | None = None, check_every_s: float | None = None,
                 bind_bank: bool | None = None, log=None, preload_every_s: float | None = None,
                 graph_sessions: int = 4):
        """`graph_sessions`: at most this many sessions of signature graphs (serving/graphs.py) beside the
        union's; 0: every batch on the union's graph."""
        import onnxruntime as ort
        export_dir = Path(export_dir)
        info = json.loads((export_dir / "backbone.json").read_text())
        self.layout = Layout.from_dict(info["layout"])
        self.inputs = info["inputs"]
        self.outputs = ["logits", "embeddings"] if self.layout.embeddings else ["logits"]
        self.info = info
        self.log = log or logging.getLogger(__name__).warning  # where details go that clients never see
        graph = export_dir / info["graph"]
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        providers = providers or default_providers()
        # onnxruntime's default spinning threads: turning them off cost ~2 ms a request at batch 1 on MiniLM
        self.session = ort.InferenceSession(str(graph), so, providers=providers)
        self.graphs = SignatureGraphs(export_dir, info, lambda p: ort.InferenceSession(str(p), so, providers=providers),
                                      self.log, graph_sessions) if info.get("export_format", "onnx") == "onnx" else None
        self.limits = _limits(info, graph)
        self.bank = AdapterBank(self.layout, info["backbone"]["num_layers"], budget_bytes, pinned + (BACKBONE,),
                                dims=info.get("dims"))
        # on a GPU the bank lives on the device and is copied there only when it changes, not on every forward
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.bind_bank = self.device == "cuda" if bind_bank is None else bind_bank
        self._bound: dict[str, tuple[int, object]] = {}  # graph input -> (bank generation, OrtValue)
        self._bound_lock = threading.Lock()
        self.store = PackStore(store or export_dir / "packs", info)
        # how often a resident adapter's pack is checked for a replacement: on every request for a local
        # folder (a stat), at most once a second for a remote store (two HEAD requests per check)
        self.check_every_s = check_every_s if check_every_s is not None else (0.0 if self.store.fs is None else 1.0)
        self._checked: dict[str, float] = {}  # resident adapter -> when its pack was last checked
        # adapter -> (store stamp, first seen, error once settled) for packs whose json's sha256 does not match
        self._pending: OrderedDict[str, tuple] = OrderedDict()
        # one load at a time (the preloader's or a request's): a request waits at most for the pack being read
        self._load_lock = threading.Lock()
        self._verified: OrderedDict[str, tuple] = OrderedDict()  # adapter -> (stamp, sha256) read and checked
        self._store_size = 0  # packs in the store, as the preloader knows it
        self._names: set[str] = set()  # the store's packs, as the preloader knows them
        self.verified_ahead = 0  # packs the background thread hashed before their first load
        self.preloaded = 0  # packs the background thread loaded
        self._stop = threading.Event()
        self._preloader = None
        if preload_every_s:
            self.start_preloading(preload_every_s)

    # ------------------------------------------------------------------ loading
    def ensure(self, names: list[str]) -> dict[str, RowError]:
        """Load adapters not yet resident, reload those whose pack changed in the store (hot swap), drop
        those whose pack was deleted; returns name -> error for those that cannot be served."""
        errors = {}
        now = time.monotonic()
        self.bank.touch(names)  # the request's resident adapters stay while its other ones load
        for n in dict.fromkeys(names):
            err = self._ensure_one(n, now)
            if err is not None:
                errors[n] = err
        if len(self._checked) > 2 * len(self.bank) + 16:  # evicted adapters leave
            self._checked = {n: t for n, t in list(self._checked.items()) if self.bank.pack(n) is not None}
        return errors

    def _ensure_one(self, n: str, now: float) -> RowError | None:
        if n == BACKBONE:
            return self._ensure_backbone()
        if not NAME.fullmatch(n):
            return RowError(Code.INVALID_INPUT, f"adapter name {show(n)} is invalid: use 1-128 letters, digits, "
                                                "'.', '_' or '-', starting with a letter or digit")
        resident = self.bank.pack(n)
        if resident is not None:
            if self.check_every_s and now - self._checked.get(n, -1e9) < self.check_every_s:
                return None
            self._checked[n] = now
        stamp = self.store.stamp(n)
        if resident is not None and resident.stamp is not None and stamp == resident.stamp:
            return None
        if stamp is None:
            self._pending.pop(n, None)
            if resident is not None:
                self.bank.remove(n)
                return RowError(Code.UNKNOWN_ADAPTER, f"unknown adapter {show(n)}: its pack was removed")
            return RowError(Code.UNKNOWN_ADAPTER, f"unknown adapter {show(n)}")
        with self._load_lock:
            resident = self.bank.pack(n)  # the preloader may have loaded it meanwhile
            if resident is not None and resident.stamp is not None and resident.stamp == stamp:
                self._checked[n] = now
                return None
            return self._load_checked(n, stamp, now, resident)

    def _load_checked(self, n: str, stamp: tuple, now: float, resident) -> RowError | None:
        """Load `n` (held: the load lock), turning what goes wrong into that adapter's error."""
        pending = self._pending.get(n)
        if pending is not None and pending[0] == stamp and pending[2] is not None:
            return None if resident is not None else pending[2]  # damaged, settled: not read again
        try:
            self._load(n)
        except PackUpdating:
            return self._updating(n, stamp, now, resident is not None)
        except MissingSlots as e:
            return self._refuse(n, stamp, RowError(Code.ADAPTER_INVALID, str(e)), resident is not None)
        except CheckpointError as e:
            err = self._checkpoint_error(n, e)
            if err.code is not Code.ADAPTER_INVALID:  # gone, or unreadable now (permissions, a remote store)
                return err
            return self._refuse(n, stamp, err, resident is not None)
        except Exception:  # noqa: BLE001 - a bug or an I/O error loading one adapter fails that adapter only
            self._log_internal(f"loading adapter {n!r}")
            return RowError(Code.INTERNAL, f"adapter {show(n)} could not be loaded (internal error; see the server log)")
        self._pending.pop(n, None)
        self._checked[n] = now  # a load is a check: resident now
        return None

    def _ensure_backbone(self) -> RowError | None:
        """The plain backbone's zero adapter, put in the bank (pinned) on first use."""
        if self.bank.pack(BACKBONE) is not None:
            return None
        if not self.layout.embeddings:
            return RowError(Code.ADAPTER_INVALID, f"{BACKBONE} (the plain backbone's embedding) needs a graph with "
                                                  "the embeddings output; this one predates it: export an adapter "
                                                  "again and `hpeft deploy` it, which re-exports the graph")
        emb = self.info.get("embedding") or {}
        tensors, sizes = backbone_pack(self.info["dims"], emb.get("pooling", "mean"), bool(emb.get("normalize")))
        version = str(self.info["backbone"].get("sha256", ""))[:16]
        self.bank.put(Pack(BACKBONE, tensors, sizes, version, (), None, "embedding"))
        return None

    def _load(self, n: str) -> None:
        """Read `n` from the store and put it in the bank (held: the load lock). The pack stays compact (the
        tensors its file holds; the bank fills the rest of its slot), and one verified before (by an earlier
        load, or hashed ahead by the preloader) is not hashed again while its files are unchanged."""
        pack = self.store.load(n, verified=self._verified.get(n), whole=False)
        self.bank.put(pack)  # checks it whole first (MissingSlots: slots the graph lacks)
        if pack.stamp is not None and pack.sha256:
            self._remember_verified(n, (pack.stamp, pack.sha256))

    def _remember_verified(self, n: str, entry: tuple) -> None:
        """(stamp, sha256) of `n`'s tensors, checked; bounded (a few hundred bytes each): as many as the store
        holds packs, and MAX_PENDING more."""
        self._verified[n] = entry
        self._verified.move_to_end(n)
        while len(self._verified) > 4 * MAX_PENDING + 2 * len(self.bank) + self._store_size:
            self._verified.popitem(last=False)

    # ------------------------------------------------------------------ preloading
    def start_preloading(self, every_s: float = 0.5) -> None:
        """Watch the store in a background thread and load what is registered or replaced there (see above)."""
        if self._preloader is not None:
            return
        self._preloader = threading.Thread(target=self._preload_loop, args=(every_s,), name="hpeft-preload",
                                           daemon=True)
        self._preloader.start()

    def stop_preloading(self) -> None:
        self._stop.set()
        if self._preloader is not None:
            self._preloader.join(timeout=10)
            self._preloader = None

    def _folder_stamp(self):
        """What changes when a pack is added, replaced or removed in a local folder (a rename in it changes
        the folder's mtime); None for a remote store (listed every time)."""
        return None if self.store.fs is not None else folder_stamp(self.store.root)

    def _preload_loop(self, every_s: float) -> None:
        """A local folder is watched with inotify (store.FolderWatch): a pass looks at the packs written or
        removed since the last one only, whatever the number in the store; the whole folder is listed at
        start, when the kernel lost track (its queue overflowed, the folder moved) and when the bank has
        room again after it was full. Without inotify (or for a remote store): the folder's stamp, and a
        listing when it changed."""
        seen, full_at, watch = None, None, None  # the folder's stamp; the bank's size when it was full
        every_s = every_s if self.store.fs is None else max(every_s, 5.0)
        first = True
        while first or not self._stop.wait(every_s):
            first = False
            try:
                changed = None  # None: list the store
                if watch is not None and not watch.lost:
                    changed = watch.changed()
                else:
                    if watch is not None:
                        watch.close()
                    watch = self.store.watch()  # before the listing: what is written meanwhile is seen next pass
                room = full_at is not None and len(self.bank) < full_at  # evicted or removed since it was full
                if watch is not None and changed is not None:
                    if room:
                        changed = None
                    elif not changed:
                        continue
                elif watch is None:
                    folder = self._folder_stamp()
                    if folder is not None and folder == seen and not room:
                        continue
                    seen = folder
                full_at = len(self.bank) if self.preload_once(None if changed is None else sorted(changed)) else None
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad pack or store error
                self._log_internal("preloading adapters")
        if watch is not None:
            watch.close()

    def preload_once(self, names: list[str] | None = None) -> bool:
        """One pass over the store (or over `names`, those that changed): load each pack not resident (or
        replaced) while the bank has room for it without evicting. Returns whether the bank was found full:
        the rest are loaded on first use, and are hashed now (`verify_ahead`), so that a first use reads and
        places a pack without hashing it."""
        if names is None:
            names = self.store.names()
            self._names = set(names)
        else:
            for n in names:
                (self._names.add if self.store.stamp(n) is not None else self._names.discard)(n)
        self._store_size = len(self._names)
        for n in names:
            if self._stop.is_set():
                return False
            if not NAME.fullmatch(n):
                continue
            resident = self.bank.pack(n)
            if resident is None:
                slot = self.bank.slot_bytes()
                if slot and (len(self.bank) + 1) * slot > self.bank.budget:
                    self.verify_ahead(names)
                    return True  # no room: never evict a served adapter to preload another
            stamp = self.store.stamp(n)
            if stamp is None or (resident is not None and resident.stamp == stamp):
                continue
            pending = self._pending.get(n)
            if pending is not None and pending[0] == stamp:
                continue  # damaged or being replaced: the request path reports it, and retries it
            now = time.monotonic()
            with self._load_lock:
                resident = self.bank.pack(n)
                if resident is not None and resident.stamp == stamp:
                    continue
                err = self._load_checked(n, stamp, now, resident)
                if err is None and self.bank.pack(n) is not None:
                    self._checked[n] = now
                    self.preloaded += 1
            time.sleep(0)  # let a request in between two packs
        return False

    def verify_ahead(self, names: list[str], duty: float = 0.25) -> int:
        """Hash the packs of `names` that are not resident and not verified in their current files (sha256
        of the tensors, as a load does), remembering (stamp, sha256): their load on a request (an LRU miss)
        then reads and places the pack, and hashes nothing. Runs at most `duty` of one core (it sleeps in
        between), one pack at a time; a local store only. Returns how many it hashed."""
        if self.store.fs is not None:
            return 0
        done = 0
        for n in names:
            if self._stop.is_set():
                break
            if not NAME.fullmatch(n) or self.bank.pack(n) is not None:
                continue
            known = self._verified.get(n)
            if known is not None and known[0] == self.store.stamp(n):
                continue
            t = time.perf_counter()
            got = self.store.verify(n)
            if got is not None:
                with self._load_lock:
                    self._remember_verified(n, got)
                done += 1
                self.verified_ahead += 1
            time.sleep(max((time.perf_counter() - t) * (1 - duty) / duty, 0.001))
        return done

    def _checkpoint_error(self, n: str, e: CheckpointError) -> RowError:
        """A pack the store cannot serve: gone meanwhile (unknown), unreadable files (internal: the detail
        goes to the log), or invalid (its message, without the store's location)."""
        if self.store.stamp(n) is None:
            return RowError(Code.UNKNOWN_ADAPTER, f"unknown adapter {show(n)}")
        if isinstance(e, PackUnreadable):
            self.log(f"hpeft: adapter {n!r}: its pack files exist but cannot be read: {e}")
            return RowError(Code.INTERNAL, f"adapter {show(n)}: its pack files cannot be read (see the server log)")
        msg = str(e)
        for where in {self.store.location, str(self.store.root)}:
            msg = msg.replace(where, "the adapter store")
        return RowError(Code.ADAPTER_INVALID, msg)

    def _updating(self, n: str, stamp: tuple, now: float, resident: bool) -> RowError | None:
        """The pack's json names other tensors: being replaced, unless the same files stay so for SETTLE_S."""
        pending = self._pending.get(n)
        if pending is None or pending[0] != stamp:
            self._remember(n, (stamp, now, None))
        elif now - pending[1] >= SETTLE_S:
            err = RowError(Code.ADAPTER_INVALID, f"adapter {show(n)}: its tensors do not match the sha256 its json "
                                                 "records: the file is damaged or incomplete; upload it again")
            self.log(f"hpeft: {err}" + ("; the resident version is still served" if resident else ""))
            return self._refuse(n, stamp, err, resident)
        if resident:  # the version being served stays until the new one is complete
            return None
        return RowError(Code.ADAPTER_UPDATING, f"adapter {show(n)} is being replaced; retry")

    def _refuse(self, n: str, stamp: tuple, err: RowError, resident: bool) -> RowError | None:
        """Remember a pack that cannot be served (until its files change); a resident version stays served."""
        self._remember(n, (stamp, time.monotonic(), err))
        return None if resident else err

    def _remember(self, n: str, entry: tuple) -> None:
        self._pending[n] = entry
        self._pending.move_to_end(n)
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    def _log_internal(self, what: str) -> None:
        import traceback
        self.log(f"hpeft: internal error {what}:\n{traceback.format_exc()}")

    # ------------------------------------------------------------------ running
    def _run_bound(self, session, feed: dict, bank: dict) -> list[np.ndarray]:
        """One forward with the bank's tensors bound as device OrtValues, refreshed when the bank's generation
        changed (called under the bank's read lock: no write can change it meanwhile); the values are shared
        by every graph's session."""
        import onnxruntime as ort
        binding = session.io_binding()
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
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def graph_for(self, names: list[str]):
        """(session, graph inputs, signature graph or None) to run a batch of adapters `names` (resident):
        the smallest signature graph covering them once its session is built, else the union's."""
        if self.graphs is not None and self.graphs.graphs:
            got = self.graphs.choose([p.needs if (p := self.bank.pack(n)) is not None else None
                                      for n in dict.fromkeys(names)])
            if got is not None:
                return got[0], got[1].inputs, got[1]
        return self.session, self.inputs, None

    def _forward(self, names: list[str], feed: dict, arrays: dict) -> list[np.ndarray]:
        """The batch on its graph (graph_for); should a signature graph's run fail, the union's serves it
        (and every batch after it: that graph is not used again)."""
        def run(session, inputs):
            bank = {n: arrays[n] for n in inputs if n in arrays}
            return self._run_bound(session, feed, bank) if self.bind_bank else session.run(self.outputs, feed | bank)
        session, inputs, g = self.graph_for(names)
        try:
            return run(session, inputs)
        except Exception:  # noqa: BLE001
            if g is None:
                raise
            self._log_internal(f"running signature graph {g.path.parent}; it is not used again")
            self.graphs.failed(g)
            return run(self.session, self.inputs)

    def infer(self, input_ids: np.ndarray, attention_mask: np.ndarray, names: list[str]) -> Answers:
        """Answers: (answer per row or None, error per row or None, version per row or None), `.tasks` and
        `.embeddings`: one forward for all rows that can run; a row's version is that of the weights that
        computed it. Token ids and masks are the caller's to check (batching.check_tokens, per request)."""
        load_errors = self.ensure(names)
        out: list = [None] * len(names)
        errs: list = [load_errors.get(n) for n in names]
        versions: list = [None] * len(names)
        result = Answers(out, errs, versions, [None] * len(names), [None] * len(names))
        ok = [r for r, n in enumerate(names) if n not in load_errors]
        if not ok:
            return result
        try:
            self._answer(ok, input_ids, attention_mask, names, result)
        except Exception:  # noqa: BLE001 - defence in depth: find the adapter whose forward fails
            self._log_internal(f"in the forward of a batch of {len(ok)} rows; running it again split by adapter")
            for n in dict.fromkeys(names[r] for r in ok):
                rows = [r for r in ok if names[r] == n]
                try:
                    self._answer(rows, input_ids, attention_mask, names, result)
                except Exception:  # noqa: BLE001
                    self._log_internal(f"in the forward of adapter {n!r}")
                    for r in rows:
                        errs[r] = RowError(Code.INTERNAL, f"the forward for adapter {show(n)} failed "
                                                          "(internal error; see the server log)")
        return result

    def _answer(self, rows: list[int], input_ids, attention_mask, names, result: Answers) -> None:
        """One forward over `rows`; fills their answers, errors, versions, tasks and embeddings into `result`."""
        out, errs, versions = result
        sub = [names[r] for r in rows]
        with self.bank.reading(sub) as (index, arrays, bank_errs):
            feed = {"input_ids": input_ids[rows], "attention_mask": attention_mask[rows], "adapter_index": index}
            got = self._forward(sub, feed, arrays)
            resident = {n: p for n in set(sub) if (p := self.bank.pack(n)) is not None}
        logits, emb = got[0], (got[1] if len(got) > 1 else None)
        for j, r in enumerate(rows):
            p = resident.get(names[r])
            if bank_errs[j] or p is None:  # loaded by ensure, then evicted to make room for another adapter
                errs[r] = RowError(Code.ADAPTER_UPDATING, f"adapter {show(names[r])} was evicted from the bank to "
                                                          "make room; retry")
                continue
            versions[r], result.tasks[r] = p.version, p.task
            result.embeddings[r] = emb[j] if emb is not None else None
            out[r] = emb[j] if p.task == "embedding" else logits[j, :len(p.labels)]


def _limits(info: dict, graph: Path) -> Limits:
    """The graph's vocabulary and longest sequence (backbone.json's dims; older exports: read the graph)."""
    dims = info.get("dims") or {}
    if "vocab" in dims and "max_positions" in dims:
        return Limits(dims["vocab"], position_limit(info["backbone"].get("model_type", ""), dims["max_positions"]))
    from .batching import NO_LIMIT, graph_limits
    return graph_limits(graph, NO_LIMIT)
