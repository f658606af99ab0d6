"""Signature graphs: the shared graph of one slot-kind signature, beside the union's (exporters/export.py
writes them into EXPORT_DIR/graphs/<key>/, each a backbone.json and its graph).

The union's graph computes, for every batch, the control flow of every slot kind any served adapter has
(an `If` per kind and layer, the union's activations, gathers of its per-row tensors): a batch of LoRA rows
on a graph that also serves UniPELT, Compacter and the prefix pays for theirs. A signature graph has only
the slot kinds of its layout; `SignatureGraphs.choose` picks, for a batch, the graph with the fewest inputs
whose layout covers every row's adapter (the bank records each pack's `needs`), or the union's. Exact either
way: an absent slot and an all-zero one give the same logits, and every graph is tested against PyTorch.

Sessions are built on first use in a background thread (about a second for MiniLM), one at a time; until
one is ready its batches run on the union's graph, so no request waits for a build. At most
`max_sessions` are held: a new one is built only when one held has been idle MIN_IDLE_S (it is dropped; a
batch running on it keeps it alive), so traffic over more signatures than that never churns builds (their
batches run on the union's graph). A graph
whose files are unreadable, of another backbone or precision, or not covered by the union's layout is
skipped (logged); one whose session cannot be built or whose run fails is not used again. The folder is
looked at again (a stat) at most once a second, so graphs deployed beside a running model are picked up.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import queue
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable, NamedTuple

from ..pack.layout import LAYOUT_VERSION, Layout
from ..pack.store import folder_stamp

GRAPHS = "graphs"
MAX_GRAPHS = 8  # signature graphs exported into one folder at most (each holds the backbone's weights)
RESCAN_S = 1.0
BUILDER_IDLE_S = 5.0  # the build thread ends once idle this long (it holds its runtime's graphs alive)
MAX_PICKS = 4096  # sets of adapter signatures whose graph is remembered
MIN_IDLE_S = 10.0  # a held session is dropped for another only once unused this long (no rebuild churn)


_EXITING = threading.Event()
_BUILDERS: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


@atexit.register
def _at_exit() -> None:
    """A session being built when the interpreter exits finishes first (onnxruntime aborts the process when
    its native code is torn down under a running build)."""
    _EXITING.set()
    for t in list(_BUILDERS):
        t.join(timeout=30)


def signature_key(layout: Layout) -> str:
    """The folder name of a layout's graph: a hash of the layout."""
    return hashlib.sha256(json.dumps(layout.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def precision(info: dict) -> tuple:
    """(fp32 | int8 | fp16, the int8 smoothing's alpha or None) a backbone.json records (exporters.quantize
    Precision.of, without onnx)."""
    q = info.get("quantization") or {}
    return q.get("mode") or q.get("precision") or "fp32", (q.get("smoothing") or {}).get("alpha")


class Graph(NamedTuple):
    key: str
    layout: Layout
    inputs: tuple[str, ...]
    path: Path


class SignatureGraphs:
    def __init__(self, export_dir: Path, info: dict, make_session: Callable[[Path], object], log,
                 max_sessions: int = 4):
        """`info`: the union graph's backbone.json; `make_session(path)` an onnxruntime session of a graph."""
        self.folder = Path(export_dir) / GRAPHS
        self.info, self.make_session, self.log, self.max_sessions = info, make_session, log, max_sessions
        self.union = Layout.from_dict(info["layout"])
        self._inputs = set(info["inputs"])
        self.graphs: dict[str, Graph] = {}
        self._picks: dict[frozenset, Graph | None] = {}  # pick()'s answers for the current graphs
        self._sessions: OrderedDict[str, object] = OrderedDict()  # least recently used first
        self._used: dict[str, float] = {}  # key -> when a batch last ran on it
        self._failed: set[str] = set()
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._builder: threading.Thread | None = None
        self._stamp, self._scanned = None, -1e9
        self.built = 0  # sessions built (a test and the bench read it)
        self.scan()

    # ------------------------------------------------------------------ the folder
    def scan(self) -> None:
        """(Re)read the graphs in the folder: each one's backbone.json, checked against the union's."""
        self._scanned, self._stamp = time.monotonic(), folder_stamp(self.folder)
        found = {}
        for f in sorted(self.folder.glob("*/backbone.json")) if self._stamp is not None else []:
            key = f.parent.name
            if key in self.graphs or key in self._failed:
                found[key] = self.graphs.get(key)
                continue
            try:
                found[key] = self._read(f)
            except Exception as e:  # noqa: BLE001 - a bad graph is skipped: the union's serves its batches
                self.log(f"hpeft: signature graph {f.parent} not used: {e}")
                self._failed.add(key)
        with self._lock:
            self.graphs = {k: g for k, g in found.items() if g is not None}
            self._picks = {}

    def _read(self, f: Path) -> Graph:
        gi = json.loads(f.read_text())
        if gi.get("format") != "hpeft-shared-backbone" or gi.get("layout_version") != LAYOUT_VERSION:
            raise ValueError("not a shared graph of this layout version")
        if gi.get("backbone", {}).get("sha256") != self.info["backbone"].get("sha256"):
            raise ValueError("it is for another backbone")
        if precision(gi) != precision(self.info):
            raise ValueError(f"its precision {precision(gi)} is not the served {precision(self.info)}")
        layout = Layout.from_dict(gi["layout"])
        if not self.union.covers(layout) or not set(gi["inputs"]) <= self._inputs:
            raise ValueError("its slots are not all in the union's graph")
        path = f.parent / gi["graph"]
        if not path.is_file():
            raise ValueError(f"{path.name} is missing")
        return Graph(f.parent.name, layout, tuple(gi["inputs"]), path)

    def _maybe_rescan(self) -> None:
        if time.monotonic() - self._scanned < RESCAN_S:
            return
        self._scanned = time.monotonic()
        if folder_stamp(self.folder) != self._stamp:
            self.scan()

    # ------------------------------------------------------------------ choosing
    def pick(self, layouts: list) -> Graph | None:
        """The graph with the fewest inputs whose layout covers all `layouts` (a row's adapter's needs; None:
        unknown), if it has fewer than the union's; else None (the union's graph). Remembered per set of
        layouts (a request's path pays a dict lookup), forgotten when the graphs change."""
        if not layouts or any(x is None for x in layouts):
            return None
        key = frozenset(layouts)
        picks = self._picks
        if key in picks:
            return picks[key]
        need = layouts[0]
        for x in layouts[1:]:
            need = need.union(x)
        best = None
        for g in self.graphs.values():
            if len(g.inputs) < len(self._inputs) and g.layout.covers(need) and (
                    best is None or len(g.inputs) < len(best.inputs)):
                best = g
        if len(picks) >= MAX_PICKS:
            picks.clear()
        picks[key] = best
        return best

    def choose(self, layouts: list):
        """(session, graph) to run a batch whose rows' adapters need `layouts`, or None: the union's graph
        (no smaller graph covers them, or its session is not built yet: it is being built meanwhile)."""
        self._maybe_rescan()
        g = self.pick(layouts)
        if g is None:
            return None
        with self._lock:
            s = self._sessions.get(g.key)
            now = time.monotonic()
            if s is not None:
                self._sessions.move_to_end(g.key)
                self._used[g.key] = now
                return s, g
            if g.key in self._failed or g.key in self._queued:
                return None
            if len(self._sessions) >= self.max_sessions:
                if not self._sessions or now - self._used[next(iter(self._sessions))] < MIN_IDLE_S:
                    return None  # every held session is in use: this signature runs on the union's graph
            self._queued.add(g.key)
        self._queue.put(g)
        with self._lock:
            if self._builder is None:
                self._builder = threading.Thread(target=self._build_loop, name="hpeft-graphs", daemon=True)
                _BUILDERS.add(self._builder)
                self._builder.start()
        return None

    def wait(self, layouts: list, timeout_s: float = 120.0):
        """choose(), waiting while the session it asks for is being built (warm-up, tests, benches); None
        where the union's graph serves these rows (no smaller graph, a failed one, or no room for one)."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.choose(layouts)
            g = self.pick(layouts)
            if got is not None or g is None or g.key not in self._queued or time.monotonic() > deadline:
                return got
            time.sleep(0.02)

    def failed(self, g: Graph) -> None:
        """A run on `g` failed: its batches go to the union's graph from now on."""
        with self._lock:
            self._failed.add(g.key)
            self._sessions.pop(g.key, None)
            self.graphs = {k: x for k, x in self.graphs.items() if k != g.key}  # replaced: pick() may be iterating
            self._picks = {}

    def _build_loop(self) -> None:
        """Build the queued sessions one at a time; end once idle BUILDER_IDLE_S (choose() starts another)."""
        while not _EXITING.is_set():
            try:
                g = self._queue.get(timeout=BUILDER_IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():  # a put after this check finds no builder and starts one
                        self._builder = None
                        return
                continue
            try:
                s = self.make_session(g.path)
            except Exception as e:  # noqa: BLE001
                self.log(f"hpeft: signature graph {g.path.parent} not used: its session cannot be built: {e}")
                with self._lock:
                    self._failed.add(g.key)
                    self._queued.discard(g.key)
                continue
            with self._lock:
                self._sessions[g.key] = s
                self._used[g.key] = time.monotonic()
                self._queued.discard(g.key)
                self.built += 1
                while len(self._sessions) > self.max_sessions:
                    self._used.pop(self._sessions.popitem(last=False)[0], None)
