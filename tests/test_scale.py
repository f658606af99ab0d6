"""Hundreds of adapters in one bank (bench/scale.py measures thousands through tritonserver): adding,
evicting and replacing an adapter writes its own slot and copies no other (one build of the arrays for
any number of same-sized packs; a larger pack rebuilds once), requests meanwhile get exact answers, and
what the bank holds per adapter is one slot. Packs are written compactly: only the tensors an adapter
uses, read back whole."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from exporters.export import export_checkpoint
from hpeft_serve import checkpoint
from hpeft_serve.pack.check import safetensors_header
from hpeft_serve.pack.layout import spec
from hpeft_serve.serving.runtime import SharedRuntime

from .test_export import _batches, _make_ckpt

TOL = 1e-5
N = 300


def _variant(pack, i: int, name: str | None = None):
    """Adapter i: LoRA B scaled by 1 + i / N, the output bias shifted by i / N."""
    t = {k: (v * np.float32(1 + i / N) if k.startswith("lora_") and k.endswith("_B") else v)
         for k, v in pack.tensors.items()}
    t["head_out_b"] = pack.tensors["head_out_b"] + np.float32(i / N)
    return dataclasses.replace(pack, name=name or f"a{i}", tensors=t, version=f"v{i}", stamp=None)


def _reference(ck, i: int, ids, mask) -> np.ndarray:
    model, _ = checkpoint.load(ck)
    with torch.no_grad():
        for la in model.adapters.layers:
            for lo in la.lora.values():
                lo.lora_B.mul_(1 + i / N)
        model.head.out_proj.bias.add_(i / N)
        return model(torch.as_tensor(ids), torch.as_tensor(mask)).numpy()


@pytest.fixture(scope="module")
def many(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("scale")
    ck = _make_ckpt(tiny_bert, "lora", root / "ck" / "lora", seed=4)
    big = _make_ckpt(tiny_bert, "lora", root / "ck2" / "lora", seed=5, r=16)
    export_checkpoint(ck, root / "export", "onnx", log=lambda *_: None)
    export_checkpoint(big, root / "big", "onnx", log=lambda *_: None)
    return root, ck


def _infer(rt, ids, mask, names):
    """rt.infer on adapters put into its bank directly (not in its store: not looked up there)."""
    rt._checked |= dict.fromkeys(names, time.monotonic())
    return rt.infer(ids, mask, names)


def _counting(bank) -> list:
    builds = []
    rebuild = bank._rebuild
    bank._rebuild = lambda *a: builds.append(a) or rebuild(*a)
    return builds


def test_grow_evict_replace_write_one_slot_and_answer_exactly(many):
    root, ck = many
    rt = SharedRuntime(root / "export", check_every_s=1e9)
    base = rt.store.load("lora")
    builds = _counting(rt.bank)
    for i in range(N):
        rt.bank.put(_variant(base, i))
        if i == 0:
            arrays = rt.bank._arrays
    assert len(builds) == 1 and rt.bank._arrays is arrays  # reserved once: no adapter copied another
    assert len(rt.bank) == N and rt.bank.resident_bytes() == N * rt.bank.slot_bytes()
    assert all(v.shape[0] == N for v in rt.bank._view.values())  # the graph is fed the used slots only
    ids, mask = (t.numpy() for t in _batches()[1])
    pick = [0, 7, 150, 299, 42]
    out, errs, versions = _infer(rt, ids, mask, [f"a{i}" for i in pick])
    assert not any(errs) and versions == [f"v{i}" for i in pick]
    for r, i in enumerate(pick):
        assert np.abs(out[r] - _reference(ck, i, ids[r:r + 1], mask[r:r + 1])[0]).max() <= TOL

    rt.bank.put(_variant(base, 11, name="a7"))  # a replacement: its own new slot, the others untouched
    again, errs, versions = _infer(rt, ids, mask, [f"a{i}" for i in pick])
    assert len(builds) == 1 and versions[1] == "v11"
    assert np.abs(again[1] - _reference(ck, 11, ids[1:2], mask[1:2])[0]).max() <= TOL
    assert all(np.array_equal(a, b) for r, (a, b) in enumerate(zip(out, again)) if r != 1)

    rt.bank.budget = 100 * rt.bank.slot_bytes()  # evicting 201 least recently used for one new adapter
    rt.bank.put(_variant(base, N, name="new"))
    assert len(builds) == 1 and len(rt.bank) == 100 and rt.bank._arrays is arrays
    resident = set(rt.bank.names())
    assert {f"a{i}" for i in pick} <= resident and "a1" not in resident and "new" in resident
    out2, errs, _ = _infer(rt, ids, mask, [f"a{i}" for i in pick])
    assert not any(errs) and all(np.array_equal(a, b) for a, b in zip(again, out2))


def test_a_larger_pack_rebuilds_once_and_every_answer_stays_exact(many):
    from hpeft_serve.pack.store import PackStore
    root, ck = many
    rt = SharedRuntime(root / "export", check_every_s=1e9)
    base = rt.store.load("lora")
    for i in range(40):
        rt.bank.put(_variant(base, i))
    builds = _counting(rt.bank)
    big = dataclasses.replace(PackStore(root / "big" / "packs", rt.store.graph).load("lora"), name="big")
    rt.bank.put(big)
    assert len(builds) == 1 and rt.bank._sizes["R_q"] == 16
    for i in range(40, 80):
        rt.bank.put(_variant(base, i))
    assert len(builds) == 1
    ids, mask = (t.numpy() for t in _batches()[1])
    pick = [0, 39, 40, 79, 5]
    out, errs, _ = _infer(rt, ids, mask, [f"a{i}" for i in pick])
    assert not any(errs)
    for r, i in enumerate(pick):
        assert np.abs(out[r] - _reference(ck, i, ids[r:r + 1], mask[r:r + 1])[0]).max() <= TOL


def test_requests_during_growth_see_only_exact_answers(many):
    root, ck = many
    rt = SharedRuntime(root / "export", check_every_s=1e9)
    base = rt.store.load("lora")
    for i in range(8):
        rt.bank.put(_variant(base, i))
    ids, mask = (t.numpy() for t in _batches()[0])
    names = ["a0", "a3", "a7"]
    want, _, _ = _infer(rt, ids, mask, names)
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(_infer(rt, ids, mask, names))
    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(8, 200):
            rt.bank.put(_variant(base, i))
            if i % 3 == 0:
                rt.bank.remove(f"a{i - 1}")
    finally:
        stop.set()
        t.join()
    assert seen and all(not any(e) and all(np.array_equal(a, b) for a, b in zip(o, want)) for o, e, _ in seen)


def test_an_exported_pack_holds_only_the_tensors_its_adapter_uses(many):
    root, _ = many
    raw = (root / "export" / "packs" / "lora.safetensors").read_bytes()
    held = set(safetensors_header(raw)) - {"__metadata__"}
    assert held and all(k.startswith(("lora_q_", "lora_v_", "head_", "gate_masked")) for k in held), held
    assert not any(k.startswith(("bitfit_", "prefix_", "seq_", "par_", "phm_")) for k in held)
    rt = SharedRuntime(root / "export")
    assert set(rt.store.load("lora").tensors) == set(spec())  # read back whole


def _register(store, i: int, raw: dict, meta: dict, version: int = 0) -> None:
    """Adapter a<i> written into the store as an upload does (tensors, then the json with their sha256)."""
    import json

    from safetensors.numpy import save

    from hpeft_serve.pack.store import PackStore
    t = {k: (v * np.float32(1 + i / N) if k.startswith("lora_") and k.endswith("_B") else v) for k, v in raw.items()}
    t["head_out_b"] = raw["head_out_b"] + np.float32(i / N)
    m = {k: v for k, v in meta.items() if k != "sha256"} | {"name": f"a{i}", "v": version}
    PackStore(store).write(f"a{i}", save(t, metadata={"format": "hpeft-pack", "hpeft_pack": json.dumps(m)}), m)


def _wait(cond, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_registered_packs_are_preloaded_in_the_background_within_the_budget(many, tmp_path):
    import json

    from safetensors.numpy import load
    root, ck = many
    src = root / "export" / "packs"
    raw, meta = load((src / "lora.safetensors").read_bytes()), json.loads((src / "lora.json").read_text())
    store = tmp_path / "packs"
    rt = SharedRuntime(root / "export", store=str(store), preload_every_s=0.02)
    try:
        for i in range(30):
            _register(store, i, raw, meta)
        # resident without any request naming them: a request's first use is a lookup
        assert _wait(lambda: len(rt.bank) == 30), len(rt.bank)
        assert rt.preloaded == 30
        ids, mask = (t.numpy() for t in _batches()[1])
        pick = [0, 29, 7, 12, 3]
        out, errs, _ = rt.infer(ids, mask, [f"a{i}" for i in pick])
        assert not any(errs)
        for r, i in enumerate(pick):
            assert np.abs(out[r] - _reference(ck, i, ids[r:r + 1], mask[r:r + 1])[0]).max() <= TOL

        # a replacement: the next request is answered by the new version (the request path checks the stamp)
        before = rt.bank.version("a7")
        _register(store, 7, raw, meta, version=1)
        _, errs, versions = rt.infer(ids, mask, [f"a{i}" for i in pick])
        assert not any(errs) and versions[2] != before
        assert versions[2] == json.loads((store / "a7.json").read_text())["sha256"][:16]

        # a damaged pack fails the requests naming it only; the watcher goes on loading what comes after it
        (store / "a30.safetensors").write_bytes(b"\0" * 64)
        (store / "a30.json").write_text(json.dumps(meta | {"name": "a30", "sha256": "0" * 64}))
        _register(store, 31, raw, meta)
        assert _wait(lambda: rt.bank.pack("a31") is not None)
        _, errs, _ = rt.infer(ids[:2], mask[:2], ["a30", "a31"])
        assert errs[0] and "a30" in errs[0] and errs[1] is None and rt.bank.pack("a30") is None
    finally:
        rt.stop_preloading()

    # under a budget of 10 slots: 10 preloaded, none evicted for preloading, the others hashed ahead in the
    # background; a miss loads on the request path without hashing (verified ahead), and an evicted pack
    # loaded again is not hashed again either (its files did not change)
    from hpeft_serve.pack import store as store_mod
    small = SharedRuntime(root / "export", store=str(store), budget_bytes=10 * rt.bank.slot_bytes(),
                          preload_every_s=0.02)
    try:
        assert _wait(lambda: len(small.bank) == 10)
        time.sleep(0.3)
        assert len(small.bank) == 10 and small.preloaded == 10
        others = len(small.store.names()) - 10
        assert _wait(lambda: small.verified_ahead == others), (small.verified_ahead, others)
        first = list(small.bank.names())
        cold = next(f"a{i}" for i in range(32) if f"a{i}" not in first)
        hashed = []
        real = store_mod.hashlib.sha256
        store_mod.hashlib.sha256 = lambda b=b"": hashed.append(1) or real(b)
        try:
            _, errs, _ = small.infer(ids[:1], mask[:1], [cold])  # a miss: evicts the least recently used
            assert errs == [None] and first[0] not in small.bank.names() and not hashed
            _, errs, _ = small.infer(ids[:1], mask[:1], [first[0]])  # back: read, checked, not hashed
            assert errs == [None] and not hashed
            _register(store, int(cold[1:]), raw, meta, version=2)  # new files: hashed again on their load
            small.bank.remove(cold)
            _, errs, versions = small.infer(ids[:1], mask[:1], [cold])
            assert errs == [None] and versions[0] == json.loads((store / f"{cold}.json").read_text())["sha256"][:16]
        finally:
            store_mod.hashlib.sha256 = real
        # a request naming the least recently used residents and adapters not resident: its loads evict
        # others, never the residents it names
        oldest = list(small.bank.names())[:2]
        colds = [f"a{i}" for i in range(32) if f"a{i}" not in small.bank.names() and i != 30][:3]
        _, errs, _ = small.infer(ids[:5], mask[:5], oldest + colds)
        assert errs == [None] * 5, errs
    finally:
        small.stop_preloading()


def test_the_watcher_looks_only_at_the_packs_that_changed(many, tmp_path):
    """With inotify, a pass after the first looks at the packs written or removed since the last one, not at
    the whole store; when the kernel loses track (a queue overflow: changed() None) the store is listed."""
    import json

    from safetensors.numpy import load

    from hpeft_serve.pack.store import FolderWatch
    root, _ = many
    src = root / "export" / "packs"
    raw, meta = load((src / "lora.safetensors").read_bytes()), json.loads((src / "lora.json").read_text())
    store = tmp_path / "packs"
    store.mkdir()
    for i in range(40):
        _register(store, i, raw, meta)
    rt = SharedRuntime(root / "export", store=str(store))
    listed, looked = [], []
    names, stamp = rt.store.names, rt.store.stamp
    rt.store.names = lambda: listed.append(1) or names()
    rt.store.stamp = lambda n: looked.append(n) or stamp(n)
    lost = {"now": False}
    changed = FolderWatch.changed
    FolderWatch.changed = lambda self: None if lost["now"] else changed(self)
    rt.start_preloading(0.02)
    try:
        assert _wait(lambda: len(rt.bank) == 40) and len(listed) == 1  # the first pass lists the store
        looked.clear()
        _register(store, 40, raw, meta)
        _register(store, 7, raw, meta, version=1)  # replaced: loaded again by the watcher
        v7 = json.loads((store / "a7.json").read_text())["sha256"][:16]
        assert _wait(lambda: rt.bank.pack("a40") is not None and rt.bank.version("a7") == v7)
        time.sleep(0.1)
        assert len(listed) == 1 and set(looked) <= {"a40", "a7"}, (len(listed), sorted(set(looked))[:5])
        lost["now"] = True
        assert _wait(lambda: len(listed) > 1)  # lost track: listed again
    finally:
        FolderWatch.changed = changed
        rt.stop_preloading()
