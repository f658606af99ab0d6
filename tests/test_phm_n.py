"""PHM (Compacter) adapters of different n in ONE shared graph: a PHM slot kind per n. Exported into one
folder the graph grows a branch per n (re-exported, packs unchanged); `hpeft deploy` of an export whose n
the deployed graph lacks extends it; n=2 and n=4 adapters, alone and mixed in one padded batch, equal the
PyTorch forward (<= 1e-5) through the ONNX graph and through SharedRuntime (serving)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.torch import load_file

from exporters.export import export_checkpoint, read_layout
from exporters.layout import bank_feed, stack
from hpeft_serve.errors import CheckpointError
from hpeft_serve.pack.layout import Layout
from hpeft_serve.serving.deploy import deploy
from hpeft_serve.serving.runtime import SharedRuntime

from .test_export import _batches, _make_ckpt, _reference

TOL = 1e-5
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def phm(tmp_path_factory, tiny_bert):
    """Compacter n=4, Compacter n=2, Compacter++ n=2 and a LoRA, on tiny-bert (hidden 128)."""
    root = tmp_path_factory.mktemp("phm")
    cks = {"c4": _make_ckpt(tiny_bert, "compacter", root / "ck" / "c4", seed=1),
           "c2": _make_ckpt(tiny_bert, "compacter", root / "ck" / "c2", labels=3, seed=2, phm_n=2),
           "pp2": _make_ckpt(tiny_bert, "compacter_pp", root / "ck" / "pp2", seed=3, phm_n=2),
           "lora": _make_ckpt(tiny_bert, "lora", root / "ck" / "lora", seed=4)}
    logs = []
    for k in ("c4", "c2", "pp2", "lora"):
        export_checkpoint(cks[k], root / "export", "onnx", log=logs.append)
    return root, cks, logs


def _packs(folder, names):
    return [(load_file(str(folder / "packs" / f"{n}.safetensors")),
             json.loads((folder / "packs" / f"{n}.json").read_text())["sizes"]) for n in names]


def test_a_second_n_re_exports_the_graph_with_a_branch_per_n(phm):
    root, _, logs = phm
    layout = read_layout(root / "export")
    assert layout.phm_n == (2, 4) and set(layout.phm) == {"attn", "ffn"}
    assert any("re-exporting" in x for x in logs)  # c2 after c4: the graph lacked n=2
    assert {"phm2_ffn_down_Wl", "phm4_ffn_down_Wl", "phm2_rule", "phm4_rule"} <= set(layout.names())
    sizes = [json.loads((root / "export" / "packs" / f"{n}.json").read_text())["sizes"]["n"] for n in ("c4", "c2")]
    assert sizes == [4, 2]  # packs keep one n each, in the format they always had


def test_onnx_graph_serves_each_n_alone_and_mixed(phm):
    root, cks, _ = phm
    folder, names = root / "export", ["c4", "c2", "pp2", "lora"]
    sess = ort.InferenceSession(str(folder / "backbone.onnx"), providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in bank_feed(stack(_packs(folder, names), read_layout(folder)),
                                               read_layout(folder)).items()}
    ids, mask = _batches()[1]  # 5 rows of mixed lengths
    base = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    for k, n in enumerate(names):
        ref = _reference(cks[n], (ids, mask))
        got = sess.run(["logits"], base | {"adapter_index": np.full(len(ids), k, np.int64)} | feed)[0]
        assert np.abs(got[:, :ref.shape[1]] - ref).max() <= TOL, n
    idx = np.array([0, 1, 2, 1, 0])
    got = sess.run(["logits"], base | {"adapter_index": idx} | feed)[0]
    for r, k in enumerate(idx):
        ref = _reference(cks[names[k]], (ids[r:r + 1], mask[r:r + 1]))
        assert np.abs(got[r:r + 1, :ref.shape[1]] - ref).max() <= TOL


@pytest.mark.parametrize("bind", [False, True], ids=["fed", "bound"])
def test_shared_runtime_serves_each_n_alone_and_mixed(phm, bind):
    root, cks, _ = phm
    rt = SharedRuntime(root / "export", bind_bank=bind)
    ids, mask = (t.numpy() for t in _batches()[1])
    for n in ("c2", "c4"):  # alone: the bank holds one n, the other n's branch is zeros
        out, errs, _ = rt.infer(ids, mask, [n] * len(ids))
        assert not any(errs) and np.abs(np.stack(out) - _reference(cks[n], (ids, mask))).max() <= TOL
    names = ["c4", "c2", "lora", "pp2", "c4"]
    out, errs, _ = rt.infer(ids, mask, names)
    assert not any(errs)
    for r, n in enumerate(names):
        ref = _reference(cks[n], (ids[r:r + 1], mask[r:r + 1]))[0]
        assert out[r].shape == ref.shape and np.abs(out[r] - ref).max() <= TOL


def test_deploy_of_a_new_n_extends_the_deployed_graph(phm, tiny_bert, tmp_path):
    root, cks, _ = phm
    export_checkpoint(cks["c4"], tmp_path / "e4", "onnx", **QUIET)
    export_checkpoint(cks["c2"], tmp_path / "e2", "onnx", **QUIET)
    assert read_layout(tmp_path / "e2").phm_n == (2,)
    repo = tmp_path / "repo"
    assert deploy(tmp_path / "e4", repo, **QUIET)["graph_changed"]
    target = repo / "hpeft" / "1" / "export"
    assert deploy(tmp_path / "e2", repo, **QUIET)["graph_changed"]  # neither graph serves both: the union
    assert read_layout(target).phm_n == (2, 4)
    rt = SharedRuntime(target)
    ids, mask = (t.numpy() for t in _batches()[0])
    out, errs, _ = rt.infer(ids, mask, ["c2", "c4", "c2"])
    assert not any(errs)
    for r, n in enumerate(["c2", "c4", "c2"]):
        assert np.abs(out[r] - _reference(cks[n], (ids[r:r + 1], mask[r:r + 1]))[0]).max() <= TOL


def test_a_graph_from_before_phm_kinds_per_n_is_refused_then_re_exported(phm, tmp_path):
    """A backbone.json with PHM sites but no phm_n (its PHM inputs took any one n): serving it is a clear
    error, and exporting into its folder re-exports a graph for what its packs need."""
    root, cks, _ = phm
    export_checkpoint(cks["c4"], tmp_path, "onnx", **QUIET)
    info = json.loads((tmp_path / "backbone.json").read_text())
    info["layout"].pop("phm_n")
    (tmp_path / "backbone.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="predates PHM slots per n"):
        Layout.from_dict(info["layout"])
    logs = []
    export_checkpoint(cks["lora"], tmp_path, "onnx", log=logs.append)  # lora alone is covered: still re-exported
    assert any("re-exporting" in x for x in logs) and read_layout(tmp_path).phm_n == (4,)
    rt = SharedRuntime(tmp_path)
    ids, mask = (t.numpy() for t in _batches()[2])
    out, errs, _ = rt.infer(ids, mask, ["c4"])
    assert not any(errs) and np.abs(out[0] - _reference(cks["c4"], (ids, mask))[0]).max() <= TOL


def test_a_pack_whose_n_the_graph_lacks_is_refused_by_the_bank(phm, tmp_path):
    root, cks, _ = phm
    export_checkpoint(cks["lora"], tmp_path / "lo", "onnx", **QUIET)
    export_checkpoint(cks["c2"], tmp_path / "c2", "onnx", **QUIET)
    rt = SharedRuntime(tmp_path / "lo")
    from hpeft_serve.pack.check import MissingSlots
    from hpeft_serve.pack.store import PackStore
    pack = PackStore(tmp_path / "c2" / "packs", rt.store.graph).load("c2")
    with pytest.raises(MissingSlots, match="needs slots the deployed graph lacks"):
        rt.bank.put(pack)
    assert rt.bank.names() == []
    ids, mask = (t.numpy() for t in _batches()[2])
    out, errs, _ = rt.infer(ids, mask, ["lora"])
    assert not any(errs) and np.abs(out[0] - _reference(cks["lora"], (ids, mask))[0]).max() <= TOL
