"""The adapter bank: resident adapter packs, stacked into the shared graph's inputs [K, ...].

Kept apart, as in vLLM's LoRA manager: validated packs on the host (PackStore); preallocated slots
(`put` writes one slot, `remove` frees it); an LRU of unpinned adapters evicted to stay under a memory
budget. The slots' sizes (ranks, prefix length, widths, labels) are always the largest over the resident
packs: they grow when a larger pack arrives and shrink back when it leaves (replaced, removed, evicted);
smaller packs are zero-padded (exact, see hpeft_serve/pack/layout.py).

Thousands of adapters: the arrays are reserved for as many slots as the memory budget holds (up to half
the machine's memory), zero-filled by the OS page by page as slots are written, so an untouched slot costs
no memory and adding, evicting or replacing an adapter is one slot written and a name -> slot map updated:
no copy of the others, whatever their number. Only a change of the slots' sizes (a larger pack, or the
largest leaving) or more pinned adapters than the reservation holds copies the residents into new arrays
(one copy per graph input, slot numbers kept). What a bank costs is `resident_bytes()`; `nbytes()` is what
it has reserved.

A pack is checked whole before anything changes (`put` refuses it with a CheckpointError and the bank is
as it was). Atomicity: one writer at a time; it writes a free slot (no reader indexes it) or builds new
arrays while readers go on with the old ones, then takes the shared lock exclusively only to publish
(arrays, sizes, name -> slot map), so a request sees an adapter's old or new weights, never a mix.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import threading
from collections import Counter, OrderedDict
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from ..errors import CheckpointError
from ..pack.check import check_shapes, check_slots
from ..pack.layout import (FILL, FIXED, Layout, bank_sizes, input_names, per_layer, place, resolve_shape, size_keys,
                           spec, split_n, symbols)
from ..pack.store import Pack

SPARE = 2  # slots beyond the budget's: a replacement is written beside the version being served


def _reservable_bytes() -> int:
    """At most half the machine's memory is reserved (address space: untouched pages cost nothing)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 8 << 30


class _State(NamedTuple):
    arrays: dict
    sizes: dict
    capacity: int
    free: list


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class UnknownAdapter(KeyError):
    pass


class AdapterBank:
    def __init__(self, layout: Layout, num_layers: int, budget_bytes: int = 1 << 30, pinned: tuple[str, ...] = (),
                 dims: dict | None = None):
        """`dims`: the graph's {"L", "d", "f"} (backbone.json "dims"), which every pack must have."""
        self.layout, self.num_layers, self.budget = layout, num_layers, budget_bytes
        self.dims = {k: dims[k] for k in FIXED} if dims else None
        self.pinned = set(pinned)
        self.inputs = input_names(layout, num_layers)
        self.lock = RWLock()
        self._writer = threading.Lock()  # one writer at a time (readers are not blocked by it)
        self._lru = threading.Lock()  # guards _packs (LRU order) against concurrent readers
        self._slots: dict[str, int] = {}  # name -> slot
        self._packs: OrderedDict[str, Pack] = OrderedDict()  # LRU order, most recent last
        self._sizes: dict[str, int] | None = None
        self._counts: dict[str, Counter] = {k: Counter() for k in size_keys() if k != "n"}  # size -> residents
        self._arrays: dict[str, np.ndarray] = {}  # reserved [capacity, ...]
        self._view: dict[str, np.ndarray] = {}  # the used slots [:highest used + 1] of each
        self._capacity = 0
        self._free: list[int] = []  # a heap of the slots no name maps to (lowest first: residents stay packed)
        self._slot_cache: dict[tuple, int] = {}  # sizes -> bytes of a slot
        self.generation = 0  # +1 whenever the arrays' contents change (a device copy of them is then stale)

    # ------------------------------------------------------------------ reading
    @contextmanager
    def reading(self, names: list[str]):
        """Yield (row index [B] int64, graph inputs, per-row error or None) under the shared lock."""
        with self.lock.read():
            index = np.zeros(len(names), np.int64)
            errors: list[str | None] = []
            for r, n in enumerate(names):
                slot = self._slots.get(n)
                errors.append(None if slot is not None else f"unknown adapter {n!r}")
                index[r] = slot if slot is not None else 0
            with self._lru:
                for n in names:
                    if n in self._packs:
                        self._packs.move_to_end(n)
            yield index, self._view, errors

    def touch(self, names) -> None:
        """Mark resident `names` most recently used (a request's adapters, before the others it names are
        loaded: loading those evicts other adapters, not these)."""
        with self._lru:
            for n in names:
                if n in self._packs:
                    self._packs.move_to_end(n)

    def names(self) -> list[str]:
        with self._lru:
            return list(self._packs)

    def __len__(self) -> int:
        return len(self._slots)

    def pack(self, name: str) -> Pack | None:
        return self._packs.get(name)

    def version(self, name: str) -> str | None:
        p = self._packs.get(name)
        return p.version if p else None

    def labels(self, name: str) -> tuple[str, ...]:
        return self._packs[name].labels

    def nbytes(self) -> int:
        """Bytes reserved: every slot of the arrays (untouched slots cost no memory)."""
        return sum(a.nbytes for a in self._arrays.values())

    def slot_bytes(self) -> int:
        return self._slot_bytes(self._sizes) if self._sizes else 0

    def resident_bytes(self) -> int:
        """Bytes the resident adapters' slots hold."""
        return len(self._slots) * self.slot_bytes()

    # ------------------------------------------------------------------ writing
    def put(self, pack: Pack) -> None:
        """Add or atomically replace an adapter (CheckpointError, and no change, if it cannot be served)."""
        with self._writer:
            used = self._check(pack)
            victims, sizes = self._plan(pack)
            state = None
            if sizes != self._sizes or not self._free:  # beside every resident: victims and an old version
                staying = len(self._slots) - len(victims) - (pack.name in self._slots) + 1  # leave on publish
                state = self._rebuild(sizes, self._capacity_for(max(staying, len(self._slots) + 1), sizes))
            arrays, free = (self._arrays, self._free) if state is None else (state.arrays, state.free)
            slot = heapq.heappop(free)  # no reader indexes it
            self._write(arrays, slot, pack)
            meta = dataclasses.replace(pack, tensors={}, needs=used)  # the tensors live in the slot
            self._publish(state, victims, (meta, slot))

    def remove(self, name: str) -> None:
        """Drop an adapter; the slots shrink to the sizes of the packs that stay."""
        with self._writer:
            if name not in self._slots:
                raise UnknownAdapter(name)
            state = None
            if len(self._slots) > 1:
                sizes = self._sizes_without([name])
                if sizes != self._sizes:
                    state = self._rebuild(sizes, self._capacity_for(len(self._slots), sizes))
            self._publish(state, [name])

    def _check(self, pack: Pack) -> Layout:
        """Everything that could refuse `pack`, before anything changes; returns the slot kinds it needs."""
        if not isinstance(pack.sizes, dict) or set(pack.sizes) != set(size_keys()):
            raise CheckpointError(f"adapter {pack.name!r}: its sizes do not name exactly the layout's sizes")
        try:
            if pack.compact:
                _check_present(pack.name, pack.tensors, pack.sizes)
            else:
                check_shapes(pack.name, pack.tensors, pack.sizes)
        except (KeyError, TypeError, ZeroDivisionError):
            raise CheckpointError(f"adapter {pack.name!r}: its sizes are incomplete or not integers") from None
        want = self.dims or {"L": self.num_layers}
        if self._sizes is not None:
            want = {k: self._sizes[k] for k in FIXED} | want
        bad = {k: pack.sizes[k] for k, v in want.items() if pack.sizes[k] != v}
        if bad:
            raise CheckpointError(f"adapter {pack.name!r} is laid out for {bad}; this bank serves "
                                  f"{ {k: want[k] for k in bad} }: export it for the served backbone")
        return check_slots(pack.name, self.layout, pack.tensors, pack.sizes)

    def _plan(self, pack: Pack) -> tuple[list[str], dict]:
        """The residents that leave for `pack` (the least recently used unpinned ones, while the bank is over
        its memory budget) and the bank's sizes then. O(victims + pinned), whatever the number resident."""
        victims: list[str] = []
        gone = [pack.name] if pack.name in self._slots else []
        with self._lru:
            order = iter(list(self._packs))  # least recently used first
        while True:
            sizes = self._sizes_without(gone + victims, pack.sizes)
            staying = len(self._slots) - len(gone) - len(victims) + 1
            if staying * self._slot_bytes(sizes) <= self.budget:
                return victims, sizes
            victim = next((n for n in order if n not in self.pinned and n != pack.name), None)
            if victim is None:
                return victims, sizes
            victims.append(victim)

    def _sizes_without(self, gone: list[str], added: dict | None = None) -> dict:
        """The bank's sizes once `gone` left and `added` (a pack's sizes) came: the largest of each."""
        if not gone and added is None:
            return self._sizes
        counts = {k: Counter(c) for k, c in self._counts.items()} if gone else self._counts
        for n in gone:
            for k, v in self._packs[n].sizes.items():
                if k in counts:
                    counts[k][v] -= 1
        fixed = {k: (added or self._sizes)[k] for k in FIXED}
        out = {k: max([v for v, c in c_.items() if c > 0] + ([added[k]] if added else []), default=0)
               for k, c_ in counts.items()}
        return bank_sizes([out | fixed | {"n": 1}])  # the floors of bank_sizes (r, C, O_* >= 1)

    def _capacity_for(self, needed: int, sizes: dict) -> int:
        """Slots to reserve: as many as the budget holds (+ spares), at most half the machine's memory, and
        never fewer than `needed` + spares."""
        slot = max(self._slot_bytes(sizes), 1)
        return max(needed, min(self.budget, _reservable_bytes()) // slot) + SPARE

    def _slot_bytes(self, sizes: dict) -> int:
        key = tuple(sorted(sizes.items()))
        got = self._slot_cache.get(key)
        if got is None:
            got = sum(4 * int(np.prod(resolve_shape(self._slot_symbols(n), sizes), dtype=np.int64)) for n in self.inputs)
            self._slot_cache = {key: got} if len(self._slot_cache) > 64 else self._slot_cache | {key: got}
        return got

    @staticmethod
    def _slot_symbols(name: str) -> tuple:
        base = name.split(".")[0]
        return symbols(base)[1:] if per_layer(base) else symbols(base)

    def _rebuild(self, sizes: dict, capacity: int) -> "_State":
        """New arrays of `sizes` with every resident in its own slot, padded or cut (exact: a bank's sizes
        are at least every resident's, so what a smaller bank cuts off is padding), built while readers go
        on with the current ones: one copy per graph input, of the used slots only."""
        used = self._used()
        capacity = max(capacity, used + 1)
        arrays = {}
        for name in self.inputs:
            new = np.zeros((capacity, *resolve_shape(self._slot_symbols(name), sizes)), np.float32)  # lazy pages
            old = self._arrays.get(name)
            if old is not None and used:
                fill = FILL.get(split_n(name.split(".")[0])[0])
                if fill is not None:
                    new[:used] = fill
                common = (slice(0, used),) + tuple(slice(0, min(a, b)) for a, b in zip(new.shape[1:], old.shape[1:]))
                new[common] = old[common]
            arrays[name] = new
        taken = set(self._slots.values())
        return _State(arrays, sizes, capacity, [s for s in range(capacity) if s not in taken])  # ascending: a heap

    def _used(self) -> int:
        """Slots 0.. up to the highest a name maps to."""
        return max(self._slots.values(), default=-1) + 1

    def _publish(self, state: "_State | None", gone: list[str], added: tuple[Pack, int] | None = None) -> None:
        """Make the new state the one readers see, all at once; the slots of `gone` (and of a replaced
        version) are free once no reader can index them."""
        gone = [n for n in gone if n in self._slots] + ([added[0].name] if added and added[0].name in self._slots
                                                          and added[0].name not in gone else [])
        with self.lock.write():
            if state is not None:
                self._arrays, self._sizes, self._capacity, self._free = state
            freed = [self._slots.pop(n) for n in gone]
            if added is not None:
                self._slots[added[0].name] = added[1]
            used = max(self._used(), 1)  # a row in error reads slot 0: it exists
            self._view = {n: a[:used] for n, a in self._arrays.items()}  # what the graph is fed (no copy)
            self.generation += 1
            with self._lru:
                for n in gone:
                    self._count(self._packs.pop(n).sizes, -1)
                if added is not None:
                    self._packs[added[0].name] = added[0]
                    self._count(added[0].sizes, +1)
        for s in freed:
            heapq.heappush(self._free, s)

    def _count(self, sizes: dict, by: int) -> None:
        for k, v in sizes.items():
            if k in self._counts:
                self._counts[k][v] += by
                if self._counts[k][v] <= 0:
                    del self._counts[k][v]

    def _write(self, arrays: dict, slot: int, pack: Pack) -> None:
        for name, arr in arrays.items():
            base, _, layer = name.partition(".")
            src = pack.tensors.get(split_n(base)[0])
            if src is None and pack.compact:  # all its fill: what place() writes for it, without building it
                arr[slot, ...] = FILL.get(split_n(base)[0], 0.0)
                continue
            place(arr[slot, ...], src[int(layer)] if layer else src, base, pack.sizes)  # a view, also 0-d


def _check_present(name: str, tensors: dict, sizes: dict) -> None:
    """A compact pack's tensors (Pack.compact: those left out are their fill): layout tensors only, each of
    the shape its pack's sizes give."""
    want = spec()
    for k, t in tensors.items():
        if k not in want or tuple(t.shape) != resolve_shape(want[k], sizes):
            raise CheckpointError(f"adapter {name!r}: tensor {str(k)[:40]} is not a layout tensor of shape "
                                  f"{list(resolve_shape(want[k], sizes)) if k in want else '(none)'}")
