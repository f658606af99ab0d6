"""The adapter bank and shared runtime (what the Triton model will wrap): a batch mixing adapters equals
each adapter alone; an unknown adapter is a per-row error and the other rows are answered; replacing an
adapter under concurrent requests never mixes weights; slots grow for larger packs; LRU eviction under a
memory budget spares pinned adapters."""

from __future__ import annotations

import threading

import time

import numpy as np
import pytest

from exporters.export import export_checkpoint
from hpeft_serve.serving.bank import AdapterBank
from hpeft_serve.serving.runtime import SharedRuntime

from .test_export import _batches, _make_ckpt, _reference

TOL = 1e-5



@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("serve")
    cks = {"uni": _make_ckpt(tiny_bert, "unipelt", root / "ck" / "uni", seed=1),
           "comp": _make_ckpt(tiny_bert, "compacter", root / "ck" / "comp", labels=3, seed=2),
           "sparse": _make_ckpt(tiny_bert, "sparse_adapter", root / "ck" / "sparse", seed=3),
           "lora": _make_ckpt(tiny_bert, "lora", root / "ck" / "lora", seed=4)}
    cks["lora_v2"] = _make_ckpt(tiny_bert, "lora", root / "ck2" / "lora", seed=5, r=16)  # same name, larger rank
    for k in ("uni", "comp", "sparse", "lora"):
        export_checkpoint(cks[k], root / "export", "onnx", log=lambda *_: None)
    return root, cks


@pytest.mark.parametrize("bind", [False, True], ids=["fed", "bound"])
def test_mixed_batch_and_unknown_adapter(served, bind):
    """`bound`: the bank bound once as OrtValues (what runs on a GPU), refreshed only when it changes."""
    root, cks = served
    rt = SharedRuntime(root / "export", bind_bank=bind)
    ids, mask = (t.numpy() for t in _batches()[1])
    names = ["uni", "comp", "nope", "sparse", "uni"]
    out, errs, _ = rt.infer(ids, mask, names)
    assert errs[2] and "nope" in errs[2] and out[2] is None
    for r, n in enumerate(names):
        if n != "nope":
            ref = _reference(cks[n], (ids[r:r + 1], mask[r:r + 1]))[0]
            assert out[r].shape == ref.shape and np.abs(out[r] - ref).max() <= TOL
    assert set(rt.bank.names()) == {"uni", "comp", "sparse"}  # loaded on first use


@pytest.mark.parametrize("bind", [False, True], ids=["fed", "bound"])
def test_replacement_is_atomic_under_concurrent_requests(served, tmp_path, bind):
    root, cks = served
    # versions are put into the bank directly here: the store is not looked at again (no reload from it)
    rt = SharedRuntime(root / "export", bind_bank=bind, check_every_s=1e9)
    v1 = rt.store.load("lora")
    ids, mask = (t.numpy() for t in _batches()[0])
    ref1 = _reference(cks["lora"], (ids, mask))
    # a second version of "lora" (rank 16: the slots grow) exported into another folder's store
    export_checkpoint(cks["lora_v2"], tmp_path, "onnx", log=lambda *_: None)
    from hpeft_serve.pack.store import PackStore
    v2 = PackStore(tmp_path / "packs", rt.store.graph).load("lora")
    ref2 = _reference(cks["lora_v2"], (ids, mask))
    assert np.abs(ref1 - ref2).max() > 1e-3  # the versions really differ
    rt.bank.put(v1)
    stop, seen, bad = threading.Event(), {"v1": 0, "v2": 0}, []

    def client():
        while not stop.is_set():
            out, errs, _ = rt.infer(ids, mask, ["lora"] * len(ids))
            got = np.stack(out)
            if np.abs(got - ref1).max() <= TOL:
                seen["v1"] += 1
            elif np.abs(got - ref2).max() <= TOL:
                seen["v2"] += 1
            else:
                bad.append(got)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(20):
        rt.bank.put(v2 if i % 2 == 0 else v1)
    stop.set()
    for t in threads:
        t.join()
    assert not bad, "a request saw a mix of two versions"
    assert seen["v1"] + seen["v2"] > 0
    for version, ref in ((v2, ref2), (v1, ref1), (v2, ref2)):  # after a replace, the next answer is the new one
        rt.bank.put(version)
        out, _, versions = rt.infer(ids, mask, ["lora"] * len(ids))
        assert np.abs(np.stack(out) - ref).max() <= TOL and set(versions) == {version.version}


def test_lru_eviction_spares_pinned(served):
    root, _ = served
    rt = SharedRuntime(root / "export")
    packs = {n: rt.store.load(n) for n in ("uni", "comp", "sparse", "lora")}
    probe = AdapterBank(rt.layout, 2)
    for p in packs.values():
        probe.put(p)
    per_slot = probe.nbytes() / probe._capacity
    bank = AdapterBank(rt.layout, 2, budget_bytes=int(3.5 * per_slot), pinned=("uni",))
    for n in ("uni", "comp", "sparse"):
        bank.put(packs[n])
    with bank.reading(["comp"]):
        pass  # comp is now more recently used than sparse
    bank.put(packs["lora"])  # over budget: the least recently used unpinned adapter goes
    assert set(bank.names()) == {"uni", "comp", "lora"}
    tight = AdapterBank(rt.layout, 2, budget_bytes=int(0.5 * per_slot), pinned=("uni",))
    tight.put(packs["uni"])
    tight.put(packs["comp"])  # the new adapter and the pinned one both stay
    assert set(tight.names()) == {"uni", "comp"}


def test_remove_then_unknown(served):
    root, _ = served
    rt = SharedRuntime(root / "export")
    rt.bank.put(rt.store.load("sparse"))
    rt.bank.remove("sparse")
    with rt.bank.reading(["sparse"]) as (_, _, errs):
        assert errs == ["unknown adapter 'sparse'"]


def test_adapters_from_an_fsspec_store(served):
    """An adapter store at an fsspec URL (memory:// here; s3:// with s3fs installed): loaded on first use,
    reloaded when its pack is replaced."""
    import fsspec
    root, cks = served
    fs = fsspec.filesystem("memory")
    src = root / "export" / "packs"
    for f in src.iterdir():
        fs.pipe_file(f"/store/{f.name}", f.read_bytes())
    ids, mask = (t.numpy() for t in _batches()[1])
    ref = {n: _reference(cks[n], (ids, mask)) for n in ("uni", "comp", "sparse")}
    rt = SharedRuntime(root / "export", store="memory://store")
    assert rt.check_every_s == 1.0  # a remote store: a resident pack is checked at most once a second
    assert "uni" in rt.store.names()
    out, errs, _ = rt.infer(ids, mask, ["uni", "comp", "uni", "sparse", "lora"])
    assert not any(errs)
    assert np.abs(out[1] - ref["comp"][1]).max() <= TOL
    for suffix in (".safetensors", ".json"):  # replace "uni" by the sparse adapter's pack (renamed)
        data = (src / f"sparse{suffix}").read_bytes()
        fs.pipe_file(f"/store/uni{suffix}", data.replace(b'"name": "sparse"', b'"name": "uni"') if suffix == ".json" else data)
    # a remote store is checked at most every check_every_s (each check is two HEAD requests on s3):
    # within it the resident version answers, after it the new one
    out, errs, old_v = rt.infer(ids, mask, ["uni"] * len(ids))
    assert np.abs(np.stack(out) - ref["uni"]).max() <= TOL
    time.sleep(1.05)
    out, errs, new_v = rt.infer(ids, mask, ["uni"] * len(ids))
    assert np.abs(np.stack(out) - ref["sparse"]).max() <= TOL
    assert set(old_v) != set(new_v) and len(set(new_v)) == 1


def _crafted(sizes: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Tensors consistent with `sizes` (random values, padding fills): what a pack of those sizes holds."""
    from hpeft_serve.pack.layout import FILL, resolve_shape, spec
    g = np.random.default_rng(seed)
    out = {}
    for k, syms in spec().items():
        t = np.asarray(g.standard_normal(resolve_shape(syms, sizes)) * 0.01, dtype=np.float32)
        out[k] = np.full_like(t, FILL[k]) if k in FILL else t
    return out


def _state(bank):
    return {k: v.copy() for k, v in bank._view.items()}, dict(bank._sizes), dict(bank._slots), bank.names()


def test_a_refused_pack_leaves_the_bank_and_every_answer_bit_identical(served):
    """Packs the bank must refuse, several of which would change its sizes were they adopted first."""
    import dataclasses
    from hpeft_serve.errors import CheckpointError
    root, _ = served
    rt = SharedRuntime(root / "export", check_every_s=1e9)
    ids, mask = (t.numpy() for t in _batches()[1])
    names = ["uni", "comp", "sparse", "lora", "uni"]
    before, errs, _ = rt.infer(ids, mask, names)
    assert not any(errs)
    good = rt.store.load("lora")
    arrays, sizes, slots, resident = _state(rt.bank)
    wide = good.sizes | {"d": 256, "R_q": 40}  # laid out for another hidden size, consistent tensors
    deep = good.sizes | {"L": 3}
    cut = dict(good.tensors) | {"lora_q_A": good.tensors["lora_q_A"][:, :2]}
    phm2 = good.sizes | {"n": 2, "r": 1, "O_ffn": 2}  # a PHM n this graph has no branch for
    bad = [dataclasses.replace(good, name="wide", tensors=_crafted(wide), sizes=wide),
           dataclasses.replace(good, name="deep", tensors=_crafted(deep), sizes=deep),
           dataclasses.replace(good, name="cut", tensors=cut),
           dataclasses.replace(good, name="phm2", tensors=_crafted(phm2), sizes=phm2),
           dataclasses.replace(good, name="lora", tensors=_crafted(wide), sizes=wide),  # a replacement too
           dataclasses.replace(good, name="keys", sizes=good.sizes | {"Z": 1})]
    for pack in bad:
        with pytest.raises(CheckpointError, match=repr(pack.name) if pack.name != "lora" else "256"):
            rt.bank.put(pack)
        a2, s2, sl2, r2 = _state(rt.bank)
        assert (s2, sl2, r2) == (sizes, slots, resident) and a2.keys() == arrays.keys()
        assert all(np.array_equal(a2[k], arrays[k]) for k in arrays), pack.name
        after, errs, _ = rt.infer(ids, mask, names)
        assert not any(errs) and all(np.array_equal(x, y) for x, y in zip(before, after)), pack.name


def test_slots_shrink_back_when_the_big_adapter_leaves(served, tmp_path):
    import dataclasses
    from hpeft_serve.pack.store import PackStore
    root, cks = served
    rt = SharedRuntime(root / "export", check_every_s=1e9)
    export_checkpoint(cks["lora_v2"], tmp_path, "onnx", log=lambda *_: None)  # rank 16: wider than any other
    big = dataclasses.replace(PackStore(tmp_path / "packs", rt.store.graph).load("lora"), name="big")
    ids, mask = (t.numpy() for t in _batches()[1])
    names = ["uni", "lora", "comp", "lora", "uni"]
    refs = [_reference(cks[n], (ids[r:r + 1], mask[r:r + 1]))[0] for r, n in enumerate(names)]
    for n in ("uni", "lora", "comp"):
        rt.bank.put(rt.store.load(n))
    small = {k: v.shape[1:] for k, v in rt.bank._arrays.items()}
    rt.bank.put(big)
    assert rt.bank._sizes["R_q"] == 16 and rt.bank._arrays["lora_q_A.0"].shape[1] == 16
    big_slot = rt.bank.nbytes() / rt.bank._capacity
    for how in ("remove", "evict"):
        if how == "evict":  # a budget that holds three adapters of the big sizes, not four
            rt.bank.budget = int(3.5 * big_slot)
            victim = rt.bank.names()[0]
            rt.bank.put(big)  # over budget: the least recently used goes, the sizes are big
            assert victim not in rt.bank.names() and rt.bank._sizes["R_q"] == 16
            with rt.bank.reading([n for n in rt.bank.names() if n != "big"]):
                pass  # now big is the least recently used
            rt.bank.put(rt.store.load(victim))  # over budget again: big goes, the sizes shrink
            assert "big" not in rt.bank.names() and set(rt.bank.names()) == {"uni", "lora", "comp"}
        else:
            rt.bank.remove("big")
        assert rt.bank._sizes["R_q"] == 8 and {k: v.shape[1:] for k, v in rt.bank._arrays.items()} == small
        out, errs, _ = rt.infer(ids, mask, names)
        assert not any(errs) and max(np.abs(o - r).max() for o, r in zip(out, refs)) <= TOL


def test_a_pack_for_another_hidden_size_asked_for_first_fails_only_its_own_rows(served, tmp_path):
    """The incident: after a (re)load the first request names a pack laid out for d=256 (consistent tensors,
    the right backbone sha256); it is refused on load, the bank never takes its sizes, and every other
    adapter answers, in that batch and after."""
    import json
    import shutil
    from safetensors.numpy import save
    from hpeft_serve.pack.store import PackStore
    root, cks = served
    store = tmp_path / "store"
    shutil.copytree(root / "export" / "packs", store)
    meta = json.loads((store / "lora.json").read_text())
    meta["sizes"] = meta["sizes"] | {"d": 256}
    PackStore(store).write("wide", save(_crafted(meta["sizes"])), meta | {"name": "wide"})
    rt = SharedRuntime(root / "export", store=str(store))
    ids, mask = (t.numpy() for t in _batches()[1])
    out, errs, _ = rt.infer(ids[:1], mask[:1], ["wide"])
    assert out == [None] and "hidden size d=256" in errs[0]
    names = ["wide", "uni", "comp", "wide", "lora"]
    for _ in range(2):
        out, errs, _ = rt.infer(ids, mask, names)
        for r, n in enumerate(names):
            if n == "wide":
                assert out[r] is None and "hidden size d=256" in errs[r]
            else:
                ref = _reference(cks[n], (ids[r:r + 1], mask[r:r + 1]))[0]
                assert errs[r] is None and np.abs(out[r] - ref).max() <= TOL
    assert rt.bank._sizes["d"] == 128 and "wide" not in rt.bank.names()


def test_a_bank_given_the_graph_dims_refuses_another_hidden_size_when_empty(served):
    import dataclasses
    from hpeft_serve.errors import CheckpointError
    root, _ = served
    rt = SharedRuntime(root / "export")
    good = rt.store.load("lora")
    bank = AdapterBank(rt.layout, 2, dims=rt.store.graph["dims"])
    wide = good.sizes | {"d": 256}
    with pytest.raises(CheckpointError, match=r"laid out for \{'d': 256\}; this bank serves \{'d': 128\}"):
        bank.put(dataclasses.replace(good, tensors=_crafted(wide), sizes=wide))
    assert bank.names() == [] and bank._arrays == {}
    bank.put(good)
    assert bank.names() == ["lora"]


def test_a_compact_load_fills_the_slot_as_a_whole_one_bit_for_bit(served):
    """The request path reads a pack as its file holds it (Pack.compact: no full tensors built) and the bank
    fills the rest of the slot: every bank tensor is bit-identical to putting the pack whole, also in a slot
    that another adapter (other slot kinds, prefix mask and padded logits at their fills) held before."""
    root, _ = served
    rt = SharedRuntime(root / "export")
    whole = {n: rt.store.load(n) for n in ("uni", "comp", "sparse", "lora")}
    compact = {n: rt.store.load(n, whole=False) for n in whole}
    assert all(p.compact and set(p.tensors) < set(whole[n].tensors) for n, p in compact.items())
    a, b = AdapterBank(rt.layout, 2), AdapterBank(rt.layout, 2)
    for n in ("uni", "comp", "sparse"):  # the same sizes in both banks
        a.put(whole[n])
        b.put(whole[n])
    for victim, n in (("uni", "lora"), ("comp", "uni"), ("sparse", "comp")):  # a freed slot, used again
        a.remove(victim)
        b.remove(victim)
        a.put(whole[n])
        b.put(compact[n])
        with a.reading([n]) as (ia, xa, _), b.reading([n]) as (ib, xb, _):
            assert ia[0] == ib[0] and set(xa) == set(xb)
            assert all(np.array_equal(xa[k], xb[k]) and not np.shares_memory(xb[k], compact[n].tensors.get(k.split(".")[0], np.zeros(1)))
                       for k in xa)
    ids, mask = (t.numpy() for t in _batches()[1])
    rt.bank.put(compact["uni"])
    rt.bank.put(compact["comp"])
    out_c, errs, _ = rt.infer(ids[:2], mask[:2], ["uni", "comp"])
    rt2 = SharedRuntime(root / "export")
    rt2.bank.put(whole["uni"])
    rt2.bank.put(whole["comp"])
    out_w, errs2, _ = rt2.infer(ids[:2], mask[:2], ["uni", "comp"])
    assert not any(errs) and not any(errs2) and all(np.array_equal(x, y) for x, y in zip(out_c, out_w))


def test_a_compact_load_refuses_what_a_whole_one_refuses(served, tmp_path):
    """The compact reader takes tensors as views of the file's bytes: byte ranges that overlap, leave a gap,
    or do not cover the data are refused by name, as the safetensors reader refuses them."""
    import json

    from hpeft_serve.errors import CheckpointError
    from hpeft_serve.pack.store import PackStore
    root, _ = served
    src = root / "export" / "packs"
    raw = (src / "lora.safetensors").read_bytes()
    meta = json.loads((src / "lora.json").read_text())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first, second = names[0], names[1]
    overlap = dict(header) | {second: header[second] | {"data_offsets": header[first]["data_offsets"]}}
    rt = SharedRuntime(root / "export")
    store = PackStore(tmp_path, rt.store.graph)

    def crafted(h, data_extra=b""):
        body = json.dumps(h).encode()
        body += b" " * (-len(body) % 8)
        return len(body).to_bytes(8, "little") + body + raw[8 + n:] + data_extra
    for bad in (crafted(overlap), crafted(header, b"\0" * 8), raw[:-4]):
        store.write("x", bad, {k: v for k, v in meta.items() if k != "sha256"})
        for whole in (True, False):
            with pytest.raises(CheckpointError, match="safetensors|tensor"):
                store.load("x", whole=whole)
    store.write("x", raw, {k: v for k, v in meta.items() if k != "sha256"})
    assert store.load("x", whole=False).compact
