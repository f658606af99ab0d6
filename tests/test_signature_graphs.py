"""Signature graphs (exporters/export.py, hpeft_serve/serving/graphs.py): a shared ONNX export writes, beside
the union's graph, the graph of each adapter signature; the runtime runs a batch on the smallest graph that
covers its rows' adapters once its session is built (the union's before that, and when a graph is bad),
every answer equal to the PyTorch forward; deploy carries the graphs; a running runtime picks up new ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from exporters.export import export_checkpoint
from hpeft_serve.pack.layout import needs
from hpeft_serve.pack.store import pack_needs
from hpeft_serve.serving import graphs as G
from hpeft_serve.serving.graphs import GRAPHS, signature_key
from hpeft_serve.serving.runtime import SharedRuntime

from .conftest import mixed_lengths
from .test_export import _make_ckpt, _reference

TOL = 1e-5
METHODS = ("lora", "unipelt", "compacter", "prefix")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("sig")
    cks = {m: _make_ckpt(tiny_bert, m, root / "ck" / m, labels=2 + i % 2, seed=10 + i) for i, m in enumerate(METHODS)}
    for m in METHODS:
        export_checkpoint(cks[m], root / "ex", "onnx", log=lambda *_: None)
    return root, cks


def _sig(folder, name):
    from safetensors.numpy import load_file
    sizes = json.loads((folder / "packs" / f"{name}.json").read_text())["sizes"]
    return needs(load_file(str(folder / "packs" / f"{name}.safetensors")), sizes).union(G.Layout(embeddings=True))


def _check(rt, cks, names, ids, mask):
    out, errs, _ = rt.infer(ids, mask, names)
    assert not any(errs), errs
    for r, n in enumerate(names):
        ref = _reference(cks[n], (ids[r:r + 1], mask[r:r + 1]))[0]
        assert out[r].shape == ref.shape and np.abs(out[r] - ref).max() <= TOL, (n, np.abs(out[r] - ref).max())
    return out


def test_export_writes_one_graph_per_signature_smaller_than_the_union(exported):
    root, _ = exported
    ex = root / "ex"
    union = G.Layout.from_dict(json.loads((ex / "backbone.json").read_text())["layout"])
    want = {signature_key(_sig(ex, m)) for m in METHODS if _sig(ex, m) != union}
    got = {p.parent.name for p in (ex / GRAPHS).glob("*/backbone.json")}
    assert got == want and len(got) >= 3
    for key in got:
        info = json.loads((ex / GRAPHS / key / "backbone.json").read_text())
        assert signature_key(G.Layout.from_dict(info["layout"])) == key
        assert len(info["inputs"]) < len(json.loads((ex / "backbone.json").read_text())["inputs"])
    assert not list((ex / GRAPHS).glob(".tmp-*"))  # built aside, renamed into place
    assert len(pack_needs(ex / "packs")) == len(METHODS)


def test_no_signature_graphs(exported, tmp_path):
    root, cks = exported
    for m in ("lora", "unipelt"):
        export_checkpoint(cks[m], tmp_path, "onnx", log=lambda *_: None, signature_graphs=False)
    assert not (tmp_path / GRAPHS).exists()


@pytest.mark.parametrize("bind", [False, True], ids=["fed", "bound"])
def test_batches_run_on_the_smallest_covering_graph_exactly(exported, bind):
    root, cks = exported
    rt = SharedRuntime(root / "ex", bind_bank=bind)
    ids, mask = (t.numpy() for t in mixed_lengths(4, 13, seed=3))
    for names in (["lora"] * 4, ["compacter"] * 4, ["unipelt", "lora", "lora", "unipelt"],
                  ["prefix", "lora", "compacter", "unipelt"]):
        _check(rt, cks, names, ids, mask)  # loads them; first run: the union's graph while a session builds
        layouts = [rt.bank.pack(n).needs for n in dict.fromkeys(names)]
        rt.graphs.wait(layouts)
        session, inputs, g = rt.graph_for(names)
        need = layouts[0]
        for x in layouts[1:]:
            need = need.union(x)
        covering = [k for k, x in rt.graphs.graphs.items() if x.layout.covers(need)]
        if not covering:
            assert g is None and session is rt.session  # no smaller graph serves these rows together
        else:
            assert g is not None and g.key == min(covering, key=lambda k: len(rt.graphs.graphs[k].inputs))
            assert len(inputs) < len(rt.inputs)
        union = rt.session.run(rt.outputs, _feed(rt, names, ids, mask, rt.inputs))[0]
        got = _check(rt, cks, names, ids, mask)
        for r in range(4):
            assert np.abs(got[r] - union[r, :len(got[r])]).max() <= TOL
    assert rt.graphs.built >= 3


def _feed(rt, names, ids, mask, inputs):
    with rt.bank.reading(names) as (index, arrays, _):
        return {"input_ids": ids, "attention_mask": mask, "adapter_index": index} | {
            n: np.array(arrays[n]) for n in inputs if n in arrays}


def test_a_lora_batch_uses_the_lora_graph_not_the_union(exported):
    root, cks = exported
    rt = SharedRuntime(root / "ex")
    ids, mask = (t.numpy() for t in mixed_lengths(3, 9, seed=1))
    _check(rt, cks, ["lora"] * 3, ids, mask)
    rt.graphs.wait([rt.bank.pack("lora").needs])
    _, inputs, g = rt.graph_for(["lora"])
    assert g is not None and g.key == signature_key(_sig(root / "ex", "lora"))
    assert not any(n.startswith(("prefix", "phm", "seq", "par")) for n in inputs)


def _copy(root, tmp_path):
    shutil.copytree(root / "ex", tmp_path / "ex")
    return tmp_path / "ex"


def test_a_graph_that_fails_to_build_or_run_leaves_the_union_serving(exported, tmp_path):
    root, cks = exported
    ex = _copy(root, tmp_path)
    lora, uni = signature_key(_sig(ex, "lora")), signature_key(_sig(ex, "unipelt"))
    comp = signature_key(_sig(ex, "compacter"))
    (ex / GRAPHS / comp / "backbone.onnx").write_bytes(b"not an onnx graph")  # the session cannot be built
    for f in ("backbone.onnx", "backbone.onnx.data"):  # builds, but takes other inputs than its json says: runs fail
        shutil.copyfile(ex / GRAPHS / lora / f, ex / GRAPHS / uni / f)
    logged = []
    rt = SharedRuntime(ex, log=logged.append)
    ids, mask = (t.numpy() for t in mixed_lengths(3, 11, seed=2))
    for n in ("compacter", "unipelt"):
        _check(rt, cks, [n] * 3, ids, mask)
        rt.graphs.wait([rt.bank.pack(n).needs])
        _check(rt, cks, [n] * 3, ids, mask)  # the run on the bad graph fails; the union's answers
        _check(rt, cks, [n] * 3, ids, mask)
        assert rt.graph_for([n])[2] is None
    assert any("cannot be built" in m for m in logged) and any("not used again" in m for m in logged)
    assert rt.graphs._failed >= {comp, uni}


@pytest.mark.parametrize("edit", ["backbone", "precision", "layout", "json"])
def test_graphs_of_another_backbone_precision_or_layout_are_skipped(exported, tmp_path, edit):
    root, cks = exported
    ex = _copy(root, tmp_path)
    key = signature_key(_sig(ex, "lora"))
    f = ex / GRAPHS / key / "backbone.json"
    info = json.loads(f.read_text())
    if edit == "backbone":
        info["backbone"]["sha256"] = "0" * 64
    elif edit == "precision":
        info["quantization"] = {"mode": "int8"}
    elif edit == "layout":
        info["layout"]["ia3"] = ["k"]  # a slot kind the union lacks
    f.write_text("{not json" if edit == "json" else json.dumps(info))
    logged = []
    rt = SharedRuntime(ex, log=logged.append)
    assert key not in rt.graphs.graphs and any(key in m for m in logged)
    ids, mask = (t.numpy() for t in mixed_lengths(2, 7, seed=4))
    _check(rt, cks, ["lora", "lora"], ids, mask)


def test_session_cap_never_churns(exported, monkeypatch):
    root, cks = exported
    rt = SharedRuntime(root / "ex", graph_sessions=1)
    ids, mask = (t.numpy() for t in mixed_lengths(2, 7, seed=5))
    _check(rt, cks, ["lora"] * 2, ids, mask)
    rt.graphs.wait([rt.bank.pack("lora").needs])
    for _ in range(3):  # another signature while the held one is in use: the union's graph, nothing built
        _check(rt, cks, ["compacter"] * 2, ids, mask)
        _check(rt, cks, ["lora"] * 2, ids, mask)
    assert rt.graphs.built == 1 and rt.graph_for(["compacter"])[2] is None
    monkeypatch.setattr(G, "MIN_IDLE_S", 0.0)  # the held one idle: the other replaces it
    rt.graphs.wait([rt.bank.pack("compacter").needs])
    assert rt.graphs.built == 2 and rt.graph_for(["compacter"])[2] is not None
    assert rt.graph_for(["lora"])[2] is None  # dropped for it (it is built again on demand, never two at once)
    assert len(rt.graphs._sessions) == 1
    assert SharedRuntime(root / "ex", graph_sessions=0).graphs.wait([rt.bank.pack("lora").needs]) is None


def test_deploy_carries_graphs_and_a_running_runtime_picks_them_up(exported, tmp_path, monkeypatch):
    from hpeft_serve.serving.deploy import deploy
    root, cks = exported
    ex = _copy(root, tmp_path)
    lora = signature_key(_sig(ex, "lora"))
    held = tmp_path / "held"
    shutil.move(ex / GRAPHS / lora, held)  # deployed without the lora graph first
    out = deploy(ex, tmp_path / "repo", log=lambda *_: None)
    target = tmp_path / "repo" / "hpeft" / "1" / "export"
    assert out["target"] == str(target)
    assert {p.parent.name for p in (target / GRAPHS).glob("*/backbone.json")} == \
        {p.parent.name for p in (ex / GRAPHS).glob("*/backbone.json")}
    rt = SharedRuntime(target)
    ids, mask = (t.numpy() for t in mixed_lengths(2, 9, seed=6))
    _check(rt, cks, ["lora"] * 2, ids, mask)
    assert rt.graphs.wait([rt.bank.pack("lora").needs], timeout_s=0.1) is None or \
        rt.graph_for(["lora"])[2].key != lora  # no lora graph yet (a covering larger one may serve)
    shutil.move(held, ex / GRAPHS / lora)
    deploy(ex, tmp_path / "repo", log=lambda *_: None)  # adds the lora graph beside the running model
    monkeypatch.setattr(G, "RESCAN_S", 0.0)
    rt.graphs.wait([rt.bank.pack("lora").needs])
    assert rt.graph_for(["lora"])[2].key == lora
    _check(rt, cks, ["lora"] * 2, ids, mask)


def test_int8_signature_graphs(exported, tmp_path):
    root, cks = exported
    for m in ("lora", "unipelt"):
        export_checkpoint(cks[m], tmp_path, "onnx", log=lambda *_: None, quantize="int8", smooth=False)
    key = signature_key(_sig(tmp_path, "lora"))
    info = json.loads((tmp_path / GRAPHS / key / "backbone.json").read_text())
    assert info["quantization"]["mode"] == "int8"
    rt = SharedRuntime(tmp_path)
    ids, mask = (t.numpy() for t in mixed_lengths(3, 9, seed=7))
    union, _, _ = rt.infer(ids, mask, ["lora"] * 3)
    rt.graphs.wait([rt.bank.pack("lora").needs])
    assert rt.graph_for(["lora"])[2].key == key
    got, _, _ = rt.infer(ids, mask, ["lora"] * 3)
    # the same int8 MatMuls on the same activations: equal to the union's int8 graph within fp32 noise
    assert max(np.abs(a - b).max() for a, b in zip(got, union)) <= 1e-4


def test_exiting_while_a_session_builds_exits_cleanly(exported):
    """onnxruntime aborts a process whose interpreter exits under a running session build: the build is
    waited for at exit (graphs._at_exit)."""
    import subprocess
    import sys
    root, _ = exported
    code = ("import numpy as np; from hpeft_serve.serving.runtime import SharedRuntime; "
            f"rt = SharedRuntime({str(root / 'ex')!r}); "
            "rt.infer(np.full((2, 5), 1001), np.ones((2, 5), np.int64), ['lora', 'lora']); "
            "assert rt.graphs._queued, 'no build under way'")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0 and "terminate called" not in got.stderr, got.stderr[-2000:]
