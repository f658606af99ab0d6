"""The adapter bank: resident adapter packs, stacked into the shared graph's inputs [K, ...].

Kept apart, as in vLLM's LoRA manager: validated packs on the host (PackStore); preallocated slots
(`put` writes one slot, `remove` frees it); an LRU of unpinned adapters evicted to stay under a memory
budget. Sizes (ranks, prefix length, widths, labels) grow the slots when a larger pack arrives; smaller
packs are zero-padded (exact, see hpeft_serve/pack/layout.py).

Atomicity: a forward reads the bank under a shared lock (`reading()`), a writer takes it exclusively only
to write its slot and publish the new name -> slot map, so a request sees an adapter's old or new weights,
never a mix; the old version's slot is reused only by later writes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np

from ..pack.layout import FILL, Layout, bank_sizes, input_names, per_layer, place, resolve_shape, spec
from ..pack.store import Pack


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
    def __init__(self, layout: Layout, num_layers: int, budget_bytes: int = 1 << 30, pinned: tuple[str, ...] = ()):
        self.layout, self.num_layers, self.budget = layout, num_layers, budget_bytes
        self.pinned = set(pinned)
        self.lock = RWLock()
        self._lru = threading.Lock()  # guards _packs (LRU order) against concurrent readers
        self._slots: dict[str, int] = {}  # name -> slot
        self._packs: OrderedDict[str, Pack] = OrderedDict()  # LRU order, most recent last
        self._sizes: dict[str, int] | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._capacity = 0
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
            yield index, self._arrays, errors

    def names(self) -> list[str]:
        return list(self._packs)

    def pack(self, name: str) -> Pack | None:
        return self._packs.get(name)

    def version(self, name: str) -> str | None:
        p = self._packs.get(name)
        return p.version if p else None

    def labels(self, name: str) -> tuple[str, ...]:
        return self._packs[name].labels

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())

    # ------------------------------------------------------------------ writing
    def put(self, pack: Pack) -> None:
        """Add or atomically replace an adapter."""
        with self.lock.write():
            sizes = bank_sizes([pack.sizes] + [p.sizes for n, p in self._packs.items() if n != pack.name])
            if self._sizes:  # never shrink the slots of a live bank
                sizes = {k: max(v, self._sizes[k]) if k != "n" else v for k, v in sizes.items()}
            need_slots = len(self._slots) + (pack.name not in self._slots)
            if sizes != self._sizes or need_slots > self._capacity:
                self._grow(sizes, max(need_slots, self._capacity + self._capacity // 4, 4))
            old = self._slots.get(pack.name)
            slot = self._free_slot(exclude=old)
            self._write(slot, pack)
            self.generation += 1
            self._slots = {**self._slots, pack.name: slot}  # publish: readers see old or new, never a mix
            with self._lru:  # keep the metadata only: the tensors live in the slot
                self._packs[pack.name] = Pack(pack.name, {}, pack.sizes, pack.version, pack.labels, pack.stamp)
                self._packs.move_to_end(pack.name)
            self._evict(keep=pack.name)

    def remove(self, name: str) -> None:
        with self.lock.write():
            if name not in self._slots:
                raise UnknownAdapter(name)
            self._slots = {k: v for k, v in self._slots.items() if k != name}
            with self._lru:
                del self._packs[name]

    def _free_slot(self, exclude: int | None) -> int:
        used = set(self._slots.values()) | ({exclude} if exclude is not None else set())
        for s in range(self._capacity):
            if s not in used:
                return s
        raise RuntimeError("no free slot after growing")  # cannot happen: _grow leaves one spare

    def _grow(self, sizes: dict, capacity: int) -> None:
        capacity += 1  # one spare slot so a replacement never overwrites the version being served
        arrays = {}
        for name in input_names(self.layout, self.num_layers):
            base = name.split(".")[0]
            symbols = spec()[base][1:] if per_layer(base) else spec()[base]
            shape = (capacity, *resolve_shape(symbols, sizes))
            arrays[name] = np.full(shape, FILL.get(base, 0.0), np.float32)
        # resident adapters move over, padded (exact, see layout.place); a change of PHM n only happens when
        # no resident adapter has PHM slots, whose values are then all zeros
        same_n = self._sizes is not None and self._sizes["n"] == sizes["n"]
        for name, old in self._arrays.items():
            for slot in self._slots.values():
                place(arrays[name][slot, ...], old[slot, ...], name.split(".")[0], {"r": 1 if same_n else 0})
        self._arrays, self._sizes, self._capacity = arrays, sizes, capacity

    def _write(self, slot: int, pack: Pack) -> None:
        for name, arr in self._arrays.items():
            base, _, layer = name.partition(".")
            src = pack.tensors[base]
            place(arr[slot, ...], src[int(layer)] if layer else src, base, pack.sizes)  # a view, also 0-d

    def _evict(self, keep: str) -> list[str]:
        """Drop least recently used unpinned adapters while the bank is over its memory budget."""
        per_slot = self.nbytes() / max(self._capacity, 1)
        evicted = []
        while len(self._slots) * per_slot > self.budget:
            victim = next((n for n in self._packs if n not in self.pinned and n != keep), None)
            if victim is None:
                break
            self._slots = {k: v for k, v in self._slots.items() if k != victim}
            with self._lru:
                del self._packs[victim]
            evicted.append(victim)
        return evicted
