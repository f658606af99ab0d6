"""Concurrent writes to the adapter store: many threads (and another process) writing different packs
under one name through PackStore.write. Writes of a name are serialized and each uses its own temp file,
so at rest the json names its tensors' sha256, no temp or lock file is left, and readers meanwhile only
ever see a complete old or new pack, or PackUpdating."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from hpeft_serve.pack.store import PackStore, PackUpdating

from .test_pack_check import GRAPH, make_pack, sizes_of

ROOT = Path(__file__).resolve().parents[1]
OTHER_PROCESS = r"""
import json, sys
from hpeft_serve.pack.store import PackStore
store, raw, meta = PackStore(sys.argv[1]), open(sys.argv[2], "rb").read(), json.loads(open(sys.argv[3]).read())
for _ in range(int(sys.argv[4])):
    store.write("x", raw, meta)
"""


def test_concurrent_writes_of_one_name_leave_a_consistent_pack(tmp_path):
    store_dir = tmp_path / "store"
    packs = [make_pack(sizes_of(), seed=s) for s in range(9)]
    versions = [hashlib.sha256(raw).hexdigest()[:16] for raw, _ in packs]
    head = {}
    store = PackStore(store_dir, GRAPH)
    store.write("x", *packs[0])
    for v, (raw, meta) in zip(versions, packs):  # what each version's tensors are
        PackStore(tmp_path / v, GRAPH).write("x", raw, meta)
        head[v] = PackStore(tmp_path / v, GRAPH).load("x").tensors["head_dense_b"]
    (tmp_path / "other.bin").write_bytes(packs[8][0])
    (tmp_path / "other.json").write_text(json.dumps(packs[8][1]))
    other = subprocess.Popen([sys.executable, "-c", OTHER_PROCESS, str(store_dir), str(tmp_path / "other.bin"),
                              str(tmp_path / "other.json"), "15"], cwd=ROOT)
    done, seen, bad = threading.Event(), {"pack": 0, "updating": 0}, []

    def writer(k):
        for i in range(6):
            try:
                PackStore(store_dir).write("x", *packs[(k + i) % 8])
            except Exception as e:  # noqa: BLE001
                bad.append(f"write: {e!r}")

    def reader():
        while not done.is_set():
            try:
                p = store.load("x")
            except PackUpdating:
                seen["updating"] += 1
                continue
            except Exception as e:  # noqa: BLE001  anything else is a failure of the test
                bad.append(repr(e))
                continue
            if p.version not in versions or not np.array_equal(p.tensors["head_dense_b"], head[p.version]):
                bad.append(f"version {p.version} does not match its tensors")
            seen["pack"] += 1

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    assert other.wait(timeout=120) == 0
    done.set()
    for t in readers:
        t.join()
    assert not bad, bad[:3]
    assert seen["pack"] > 0
    meta = json.loads((store_dir / "x.json").read_text())
    assert meta["sha256"] == hashlib.sha256((store_dir / "x.safetensors").read_bytes()).hexdigest()
    assert sorted(p.name for p in store_dir.iterdir()) == ["x.json", "x.safetensors"]  # no temp or lock file
    assert store.load("x").version in versions
