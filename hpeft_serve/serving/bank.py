"""The adapter bank: resident adapter packs, stacked into the shared graph's inputs [K, ...].

Kept apart, as in vLLM's LoRA manager: validated packs on the host (PackStore); preallocated slots
(`put` writes one slot, `remove` frees it); an LRU of unpinned adapters evicted to stay under a memory
budget. The slots' sizes (ranks, prefix length, widths, labels) are always the largest over the resident
packs: they grow when a larger pack arrives and shrink back when it leaves (replaced, removed, evicted);
smaller packs are zero-padded (exact, see hpeft_serve/pack/layout.py).

A pack is checked whole before anything changes (`put` refuses it with a CheckpointError and the bank is
as it was). Atomicity: one writer at a time; it writes a free slot (no reader indexes it) or builds new
arrays while readers go on with the old ones, then takes the shared lock exclusively only to publish
(arrays, sizes, name -> slot map), so a request sees an adapter's old or new weights, never a mix.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np

from ..errors import CheckpointError
from ..pack.check import check_shapes, check_slots
from ..pack.layout import (FILL, FIXED, Layout, bank_sizes, copy_slot, input_names, per_layer, place, resolve_shape,
                           size_keys, split_n, symbols)
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
        with self._lru:
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
        """Add or atomically replace an adapter (CheckpointError, and no change, if it cannot be served)."""
        with self._writer:
            self._check(pack)
            keep, sizes = self._plan(pack)
            old = self._slots.get(pack.name)
            capacity = self._capacity_for(len(keep) + 1)
            if sizes == self._sizes and capacity == self._capacity and len(self._slots) < self._capacity:
                arrays, slots = self._arrays, {n: self._slots[n] for n in keep}
                slot = self._free_slot(exclude=old)  # no reader indexes it: written in place
            else:
                arrays, slots = self._build(sizes, capacity, keep)
                slot = len(keep)
            self._write(arrays, slot, pack)
            meta = dataclasses.replace(pack, tensors={})  # the tensors live in the slot
            self._publish(arrays, sizes, capacity, {**slots, pack.name: slot}, meta)

    def remove(self, name: str) -> None:
        """Drop an adapter; the slots shrink to the sizes of the packs that stay."""
        with self._writer:
            if name not in self._slots:
                raise UnknownAdapter(name)
            keep = [n for n in self.names() if n != name]
            sizes = bank_sizes([self._packs[n].sizes for n in keep]) if keep else self._sizes
            capacity = self._capacity_for(len(keep)) if keep else self._capacity
            if sizes == self._sizes and capacity == self._capacity:
                arrays, slots = self._arrays, {n: self._slots[n] for n in keep}
            else:
                arrays, slots = self._build(sizes, capacity, keep)
            self._publish(arrays, sizes, capacity, slots)

    def _check(self, pack: Pack) -> None:
        """Everything that could refuse `pack`, before anything changes."""
        if not isinstance(pack.sizes, dict) or set(pack.sizes) != set(size_keys()):
            raise CheckpointError(f"adapter {pack.name!r}: its sizes do not name exactly the layout's sizes")
        try:
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
        check_slots(pack.name, self.layout, pack.tensors, pack.sizes)

    def _plan(self, pack: Pack) -> tuple[list[str], dict]:
        """The residents that stay beside `pack` (the least recently used unpinned ones leave while the bank
        is over its memory budget) and the bank's sizes then."""
        keep = [n for n in self.names() if n != pack.name]  # least recently used first
        while True:
            sizes = bank_sizes([pack.sizes] + [self._packs[n].sizes for n in keep])
            if (len(keep) + 1) * self._slot_bytes(sizes) <= self.budget:
                return keep, sizes
            victim = next((n for n in keep if n not in self.pinned), None)
            if victim is None:
                return keep, sizes
            keep.remove(victim)

    def _capacity_for(self, needed: int) -> int:
        """Slots to allocate for `needed` adapters (+1 spare, so a replacement never overwrites the version
        being served): the current capacity while it fits and is not over twice what is needed."""
        if needed < self._capacity <= 2 * max(needed, 4) + 1:
            return self._capacity
        return max(needed + needed // 4, 4) + 1

    def _slot_bytes(self, sizes: dict) -> int:
        return sum(4 * int(np.prod(resolve_shape(self._slot_symbols(n), sizes), dtype=np.int64)) for n in self.inputs)

    @staticmethod
    def _slot_symbols(name: str) -> tuple:
        base = name.split(".")[0]
        return symbols(base)[1:] if per_layer(base) else symbols(base)

    def _build(self, sizes: dict, capacity: int, keep: list[str]) -> tuple[dict, dict]:
        """New arrays of `sizes` holding the residents `keep` in slots 0.. (padded or cut: exact, see
        layout.copy_slot), built while readers go on with the current ones."""
        arrays = {}
        for name in self.inputs:
            shape = (capacity, *resolve_shape(self._slot_symbols(name), sizes))
            arrays[name] = np.full(shape, FILL.get(split_n(name.split(".")[0])[0], 0.0), np.float32)
            for new, n in enumerate(keep):
                copy_slot(arrays[name][new, ...], self._arrays[name][self._slots[n], ...])
        return arrays, {n: i for i, n in enumerate(keep)}

    def _publish(self, arrays: dict, sizes: dict | None, capacity: int, slots: dict, added: Pack | None = None):
        """Make the new state the one readers see, all at once."""
        with self.lock.write():
            self._arrays, self._sizes, self._capacity = arrays, sizes, capacity
            self._slots = slots  # readers see old or new, never a mix
            self.generation += 1
            with self._lru:
                if added is not None:
                    self._packs[added.name] = added
                    self._packs.move_to_end(added.name)
                for n in [n for n in self._packs if n not in slots]:
                    del self._packs[n]

    def _free_slot(self, exclude: int | None) -> int:
        used = set(self._slots.values()) | ({exclude} if exclude is not None else set())
        for s in range(self._capacity):
            if s not in used:
                return s
        raise RuntimeError("no free slot")  # cannot happen: put rebuilds when none is free

    def _write(self, arrays: dict, slot: int, pack: Pack) -> None:
        for name, arr in arrays.items():
            base, _, layer = name.partition(".")
            src = pack.tensors[split_n(base)[0]]
            place(arr[slot, ...], src[int(layer)] if layer else src, base, pack.sizes)  # a view, also 0-d
