"""The real tritonserver (from the nvidia-pytriton wheel), started and stopped by these tests, serving
model `hpeft`: REST (KServe v2 JSON) and gRPC answers equal the PyTorch forward for adapters of all five
hybrid methods; one request mixing adapters equals each alone; an unknown adapter, a wrong dtype or
shape, an over-long sequence each get a clear error and serving goes on; an adapter deployed or replaced
while serving is answered without a restart, and concurrent requests never see a mix of versions.
Embeddings: a request mixing embedding adapters (max and mean pooling, normalised or not), classifiers and
"@backbone" gets `embeddings` and `logits` per row equal to PyTorch over REST and gRPC; a merged embedding
export deploys as a model with output `embeddings`."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from exporters.export import export_checkpoint
from hpeft_serve.serving.client import free_ports, hpeft_inputs
from hpeft_serve.serving.deploy import deploy
from hpeft_serve.serving.triton import TritonServer

from .test_embed_export import make_embed_ckpt, plain, pooled
from .test_export import _batches, _make_ckpt, _reference

TOL = 1e-5
METHODS = {"uni": "unipelt", "mam": "mam", "comp": "compacter", "sparse": "sparse_adapter", "s4": "s4"}
EMBED = {"emax": ("mam", "max", True), "emean": ("lora", "mean", False)}
REPO_SRC = Path(__file__).resolve().parent.parent / "model_repository"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("triton")
    cks = {n: _make_ckpt(tiny_bert, m, root / "ck" / n, labels=3 if n == "comp" else 2, seed=i)
           for i, (n, m) in enumerate(METHODS.items())}
    cks |= {n: make_embed_ckpt(tiny_bert, m, root / "ck" / n, p, z, seed=10 + i) for i, (n, (m, p, z)) in enumerate(EMBED.items())}
    for ck in cks.values():
        export_checkpoint(ck, root / "export", "onnx", log=lambda *_: None)
    repo = root / "repo"  # a new repository: deploy writes the model's config and model.py
    deploy(root / "export", repo, log=lambda *_: None)
    http, grpc, metrics = free_ports()
    with TritonServer(repo, http, grpc, metrics, work=root / "work") as s:
        yield {"root": root, "repo": repo, "cks": cks, "server": s, "grpc": f"127.0.0.1:{grpc}",
               "http": f"http://127.0.0.1:{http}"}


def test_the_committed_repository_is_what_deploy_writes(tmp_path):
    from hpeft_serve.serving.deploy import write_model
    write_model(tmp_path)
    for f in ("config.pbtxt", "1/model.py"):
        assert (tmp_path / "hpeft" / f).read_text() == (REPO_SRC / "hpeft" / f).read_text()


def _grpc(srv, ids, mask, names, ids_dtype="INT64", output="logits"):
    client = grpcclient.InferenceServerClient(srv["grpc"])
    return client.infer("hpeft", hpeft_inputs(grpcclient, ids, mask, names, ids_dtype)).as_numpy(output)


def _rest(srv, ids, mask, names, output="logits"):
    body = {"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": list(ids.shape), "data": ids.flatten().tolist()},
        {"name": "attention_mask", "datatype": "INT64", "shape": list(mask.shape), "data": mask.flatten().tolist()},
        {"name": "adapter", "datatype": "BYTES", "shape": [len(names), 1], "data": names}]}
    req = urllib.request.Request(srv["http"] + "/v2/models/hpeft/infer", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out = next(o for o in json.loads(r.read())["outputs"] if o["name"] == output)
    return np.array(out["data"], np.float32).reshape(out["shape"])


def test_one_request_mixing_embeddings_classifiers_and_the_backbone_over_rest_and_grpc(server, tiny_bert):
    ids, mask = _tokens()
    names = ["emax", "uni", "@backbone", "emean", "comp"]
    cks = server["cks"]
    for call in (_grpc, _rest):
        emb, logits = call(server, ids, mask, names, output="embeddings"), call(server, ids, mask, names)
        assert emb.shape == (5, tiny_bert.config.hidden_size) and logits.shape == (5, 3)  # comp has 3 labels
        for r, n in enumerate(names):
            row = (ids[r:r + 1], mask[r:r + 1])
            if n == "@backbone":  # tiny-bert's backbone.json: mean pooling, not normalised
                ref = plain(tiny_bert, *row, "mean", False)[0]
            else:
                ref = _reference(cks[n], row)[0] if n in EMBED else pooled(cks[n], *row)[0]
            assert np.abs(emb[r] - ref).max() <= TOL
            if n in EMBED or n == "@backbone":
                assert (logits[r] == np.finfo(np.float32).min).all()
            else:
                ref = _reference(cks[n], row)[0]
                assert np.abs(logits[r, :len(ref)] - ref).max() <= TOL
        only = call(server, ids, mask, ["emean"] * len(ids), output="logits")  # no classifier row: 0 wide
        assert only.shape == (len(ids), 0)


def _tokens():
    ids, mask = _batches()[1]
    return ids.numpy(), mask.numpy()


@pytest.mark.parametrize("name", list(METHODS))
def test_rest_and_grpc_equal_pytorch(server, name):
    ids, mask = _tokens()
    ref = _reference(server["cks"][name], (ids, mask))
    for call in (_grpc, _rest):
        got = call(server, ids, mask, [name] * len(ids))
        assert got.shape == ref.shape and np.abs(got - ref).max() <= TOL


def test_one_request_mixing_adapters_equals_each_alone(server):
    ids, mask = _tokens()
    names = ["uni", "comp", "sparse", "mam", "s4"]
    got = _grpc(server, ids, mask, names)
    for r, n in enumerate(names):
        ref = _reference(server["cks"][n], (ids[r:r + 1], mask[r:r + 1]))[0]
        assert np.abs(got[r, :len(ref)] - ref).max() <= TOL


def test_bad_requests_get_clear_errors_and_serving_goes_on(server):
    ids, mask = _tokens()
    with pytest.raises(InferenceServerException, match="unknown adapter 'nope'"):
        _grpc(server, ids, mask, ["uni", "nope", "uni", "uni", "uni"])
    with pytest.raises(urllib.error.HTTPError) as e:
        _rest(server, ids, mask, ["nope"] * len(ids))
    assert "unknown adapter" in e.value.read().decode()
    with pytest.raises(InferenceServerException, match="input_ids"):  # wrong dtype
        _grpc(server, ids.astype(np.float32), mask, ["uni"] * len(ids), ids_dtype="FP32")
    with pytest.raises(InferenceServerException, match="attention_mask"):  # shapes differ
        _grpc(server, ids, mask[:, :-1].copy(), ["uni"] * len(ids))
    long_ids = np.full((1, 600), 1000, np.int64)
    with pytest.raises(InferenceServerException, match="exceeds the maximum 512"):
        _grpc(server, long_ids, np.ones_like(long_ids), ["uni"])
    ref = _reference(server["cks"]["uni"], (ids, mask))
    assert np.abs(_grpc(server, ids, mask, ["uni"] * len(ids)) - ref).max() <= TOL


def test_unknown_adapter_in_a_batch_leaves_other_requests_answered(server):
    ids, mask = _tokens()
    results, errors = {}, {}

    def call(key, names):
        try:
            results[key] = _grpc(server, ids, mask, names)
        except InferenceServerException as e:
            errors[key] = str(e)

    threads = [threading.Thread(target=call, args=(k, [n] * len(ids))) for k, n in
               (("good1", "uni"), ("bad", "missing"), ("good2", "mam"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {"good1", "good2"} and "missing" in errors["bad"]


def test_hot_swap_without_restart(server, tiny_bert):
    root, repo = server["root"], server["repo"]
    ids, mask = _tokens()
    pid = server["server"].proc.pid
    new = _make_ckpt(tiny_bert, "lora", root / "ck2" / "fresh", seed=21)  # a new adapter while serving
    export_checkpoint(new, root / "export2", "onnx", log=lambda *_: None)
    deploy(root / "export2", repo, log=lambda *_: None)
    assert np.abs(_grpc(server, ids, mask, ["fresh"] * len(ids)) - _reference(new, (ids, mask))).max() <= TOL
    v2 = _make_ckpt(tiny_bert, "lora", root / "ck3" / "fresh", seed=22)  # a replacement of it
    export_checkpoint(v2, root / "export3", "onnx", log=lambda *_: None)
    refs = [_reference(new, (ids, mask)), _reference(v2, (ids, mask))]
    stop, failures, seen = threading.Event(), [], set()

    def client():
        while not stop.is_set():
            try:
                got = _grpc(server, ids, mask, ["fresh"] * len(ids))
            except InferenceServerException as e:
                failures.append(str(e))
                continue
            match = [k for k, ref in enumerate(refs) if np.abs(got - ref).max() <= TOL]
            seen.update(match) if match else failures.append("an answer matching neither version")

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    deploy(root / "export3", repo, log=lambda *_: None)
    deadline = threading.Event()
    for _ in range(100):
        if 1 in seen:
            break
        deadline.wait(0.1)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert seen == {0, 1} or 1 in seen
    assert np.abs(_grpc(server, ids, mask, ["fresh"] * len(ids)) - refs[1]).max() <= TOL
    assert server["server"].proc.pid == pid and server["server"].proc.poll() is None  # never restarted


def test_deploying_exports_of_other_slot_kinds_extends_the_graph(tmp_path, tiny_bert):
    """Three adapters exported into three folders (three graphs with different slot kinds) deployed into
    one repository: the repository's graph serves all of them exactly."""
    cks = {m: _make_ckpt(tiny_bert, m, tmp_path / "ck" / m, seed=i) for i, m in enumerate(("mam", "lora", "compacter"))}
    repo = tmp_path / "repo"
    for m, ck in cks.items():
        export_checkpoint(ck, tmp_path / f"export-{m}", "onnx", log=lambda *_: None)
        deploy(tmp_path / f"export-{m}", repo, log=lambda *_: None)
    from hpeft_serve.serving.runtime import SharedRuntime
    rt = SharedRuntime(repo / "hpeft" / "1" / "export")
    ids, mask = _tokens()
    names = ["mam", "lora", "compacter", "lora", "mam"]
    out, errs, _ = rt.infer(ids, mask, names)
    assert not any(errs)
    for r, n in enumerate(names):
        assert np.abs(out[r] - _reference(cks[n], (ids[r:r + 1], mask[r:r + 1]))[0]).max() <= TOL


def test_a_pack_the_graph_cannot_serve_is_refused(tmp_path, tiny_bert):
    from hpeft_serve.serving.runtime import SharedRuntime
    lora, mam = (_make_ckpt(tiny_bert, m, tmp_path / "ck" / m) for m in ("lora", "mam"))
    export_checkpoint(lora, tmp_path / "e1", "onnx", log=lambda *_: None)
    export_checkpoint(mam, tmp_path / "e2", "onnx", log=lambda *_: None)
    shutil.copy(tmp_path / "e2" / "packs" / "mam.json", tmp_path / "e1" / "packs" / "mam.json")  # bypassing deploy
    shutil.copy(tmp_path / "e2" / "packs" / "mam.safetensors", tmp_path / "e1" / "packs" / "mam.safetensors")
    ids, mask = _tokens()
    out, errs, _ = SharedRuntime(tmp_path / "e1").infer(ids, mask, ["lora", "mam", "lora", "lora", "lora"])
    assert errs[1] and "lacks" in errs[1] and out[0] is not None


def _deploy_merged(server, ck, tmp_path, output: str) -> np.ndarray:
    """`hpeft deploy --url` of ck's merged export into the running server; its answer (`output`) on _tokens()."""
    import subprocess
    import sys
    export_checkpoint(ck, tmp_path / "merged", "onnx", merged=True, log=lambda *_: None)
    r = subprocess.run([sys.executable, "-m", "hpeft_serve.cli", "deploy", str(tmp_path / "merged"), "--repo",
                        str(server["repo"]), "--url", server["grpc"]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ids, mask = _tokens()
    inputs = [grpcclient.InferInput("input_ids", list(ids.shape), "INT64"),
              grpcclient.InferInput("attention_mask", list(mask.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(mask)
    return grpcclient.InferenceServerClient(server["grpc"]).infer(ck.name, inputs).as_numpy(output)


def test_merged_adapter_deployed_while_serving(server, tmp_path):
    """A merged export becomes its own Triton model, loaded over gRPC into the running server."""
    ck = server["cks"]["mam"]
    ids, mask = _tokens()
    assert np.abs(_deploy_merged(server, ck, tmp_path, "logits") - _reference(ck, (ids, mask))).max() <= TOL
    uni = _reference(server["cks"]["uni"], (ids, mask))
    assert np.abs(_grpc(server, ids, mask, ["uni"] * len(ids)) - uni).max() <= TOL


def test_merged_embedding_adapter_deploys_with_output_embeddings(server, tmp_path):
    ck = server["cks"]["emax"]
    got = _deploy_merged(server, ck, tmp_path, "embeddings")
    assert 'name: "embeddings"' in (server["repo"] / "emax" / "config.pbtxt").read_text()
    assert np.abs(got - _reference(ck, _tokens())).max() <= TOL
