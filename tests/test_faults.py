"""The fault-and-bad-input matrix of model `hpeft` (and the merged model) against the real tritonserver:
one test per class of bad request or broken pack, each sent over KServe v2 REST and gRPC where the class
is about a request, each expecting its status (HTTP and gRPC), its code tag and its message; a message never
holds the store's path or a Python stack frame; and after every row the three served adapters (of three
methods) answer BIT-IDENTICALLY what they answered before it. Rows of bad requests run concurrently with
good ones, so that they share dynamic batches: the good ones are answered, exactly.

One module-scoped server serves the whole matrix (the rows change only packs of their own names)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from exporters.export import export_checkpoint
from hpeft_serve.serving.client import free_ports, hpeft_inputs
from hpeft_serve.serving.codes import Code, parse
from hpeft_serve.serving.deploy import deploy
from hpeft_serve.serving.triton import TritonServer

from .test_export import _batches, _make_ckpt, _reference

TOL = 1e-5
SERVED = {"uni": "unipelt", "comp": "compacter", "lora": "lora"}
VOCAB = 30522  # tiny-bert's


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("faults")
    cks = {n: _make_ckpt(tiny_bert, m, root / "ck" / n, labels=3 if n == "comp" else 2, seed=i)
           for i, (n, m) in enumerate(SERVED.items())}
    for ck in cks.values():
        export_checkpoint(ck, root / "export", "onnx", log=lambda *_: None)
    merged = _make_ckpt(tiny_bert, "mam", root / "ck" / "merged1", seed=7)
    export_checkpoint(merged, root / "merged", "onnx", merged=True, log=lambda *_: None)
    repo = root / "repo"
    deploy(root / "export", repo, log=lambda *_: None)
    deploy(root / "merged", repo, log=lambda *_: None)
    ids, mask = (t.numpy() for t in _batches()[1])
    http, grpc, metrics = free_ports()
    with TritonServer(repo, http, grpc, metrics, work=root / "work") as s:
        srv = {"root": root, "packs": repo / "hpeft" / "1" / "export" / "packs", "server": s, "ids": ids,
               "mask": mask, "grpc": f"127.0.0.1:{grpc}", "http": f"http://127.0.0.1:{http}", "merged": merged,
               "repo": repo, "metrics": metrics}
        srv["refs"] = {n: _reference(ck, (ids, mask)) for n, ck in cks.items()}
        srv["before"] = {n: _grpc(srv, ids, mask, [n] * len(ids)) for n in SERVED}
        for n, got in srv["before"].items():
            assert np.abs(got - srv["refs"][n]).max() <= TOL
        yield srv


@pytest.fixture(autouse=True)
def _served_unchanged(request, srv):
    """After every row: the three adapters answer bit for bit what they answered before the matrix."""
    yield
    for n in SERVED:
        got = _grpc(srv, srv["ids"], srv["mask"], [n] * len(srv["ids"]))
        assert np.array_equal(got, srv["before"][n]), f"{n} changed after {request.node.name}"


# ------------------------------------------------------------------ calls
def _grpc(srv, ids, mask, names, ids_dtype="INT64", model="hpeft"):
    client = grpcclient.InferenceServerClient(srv["grpc"])
    if model != "hpeft":
        inputs = hpeft_inputs(grpcclient, ids, mask, ["x"] * len(ids), ids_dtype)[:2]
        return client.infer(model, inputs).as_numpy("logits")
    return client.infer(model, hpeft_inputs(grpcclient, ids, mask, names, ids_dtype)).as_numpy("logits")


def _rest_body(ids, mask, names, ids_dtype="INT64"):
    ids, mask = np.asarray(ids), np.asarray(mask)
    inputs = [{"name": "input_ids", "datatype": ids_dtype, "shape": list(ids.shape), "data": ids.flatten().tolist()},
              {"name": "attention_mask", "datatype": "INT64", "shape": list(mask.shape), "data": mask.flatten().tolist()}]
    if names is not None:
        inputs.append({"name": "adapter", "datatype": "BYTES", "shape": [len(names), 1], "data": names})
    return {"inputs": inputs}


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _rest(srv, body, model="hpeft") -> tuple[int, dict]:
    return _post(f"{srv['http']}/v2/models/{model}/infer", body)


def _clean(srv, msg: str) -> str:
    """The message, after checking that it names no path of the server and holds no stack frame."""
    for leak in (str(srv["root"]), "/packs", "Traceback", 'File "', ".py\", line"):
        assert leak not in msg, f"the message leaks {leak!r}: {msg}"
    return msg


def _refused(srv, ids, mask, names, http: int, grpc: str, code: Code | None, text: str, model="hpeft",
             ids_dtype="INT64"):
    """The same request over REST and gRPC: refused with these statuses, this code tag and this text."""
    status, body = _rest(srv, _rest_body(ids, mask, None if model != "hpeft" else names, ids_dtype), model)
    assert status == http, (status, body)
    assert parse(_clean(srv, body["error"]))[0] == code and text in body["error"], body["error"]
    with pytest.raises(InferenceServerException) as e:
        _grpc(srv, ids, mask, names, ids_dtype, model)
    msg = _clean(srv, e.value.message())
    assert e.value.status() == f"StatusCode.{grpc}", (e.value.status(), msg)
    assert parse(msg)[0] == code and text in msg, msg
    return msg


def _with_good_traffic(srv, bad, rounds: int = 6) -> list:
    """`bad()` sent `rounds` times while good requests of all three adapters run at once (12 threads): every
    good one answered within TOL of its answer alone; returns what each bad call returned or raised."""
    ids, mask = srv["ids"], srv["mask"]

    def good(n):
        return n, _grpc(srv, ids, mask, [n] * len(ids))

    def wrapped():
        try:
            return bad()
        except Exception as e:  # noqa: BLE001 - collected and checked by the row
            return e

    with ThreadPoolExecutor(12) as pool:
        jobs = []
        for _ in range(rounds):
            jobs += [pool.submit(good, n) for n in SERVED] + [pool.submit(wrapped)] + [pool.submit(good, n) for n in SERVED]
        results = [j.result() for j in jobs]
    answers = [r for r in results if isinstance(r, tuple)]
    assert len(answers) == 6 * rounds
    for n, got in answers:
        assert np.abs(got - srv["refs"][n]).max() <= TOL
    return [r for r in results if not isinstance(r, tuple)]


def _bad_token(srv, value):
    ids = srv["ids"].copy()
    ids[1, 2] = value
    return ids


# ------------------------------------------------------------------ bad requests
@pytest.mark.parametrize("value", [VOCAB, 10 ** 7, -1], ids=["vocab", "1e7", "negative"])
def test_a_token_id_outside_the_vocabulary_fails_its_request_only(srv, value):
    ids = _bad_token(srv, value)
    _refused(srv, ids, srv["mask"], ["uni"] * len(ids), 400, "INVALID_ARGUMENT", Code.INVALID_INPUT,
             f"token id {value} is outside the vocabulary [0, {VOCAB})")
    errors = _with_good_traffic(srv, lambda: _grpc(srv, ids, srv["mask"], ["comp"] * len(ids)))
    assert errors and all(isinstance(e, InferenceServerException) and "outside the vocabulary" in str(e)
                          for e in errors), errors


@pytest.mark.parametrize("fault", ["two", "minus_one", "all_zero_row"])
def test_a_bad_attention_mask_fails_its_request_only(srv, fault):
    mask = srv["mask"].copy()
    if fault == "all_zero_row":
        mask[2] = 0
        text = "attention_mask row 2 is all zeros"
    else:
        mask[0, 0] = 2 if fault == "two" else -1
        text = f"attention_mask holds {2 if fault == 'two' else -1}: its values must be 0 or 1"
    ids = srv["ids"]
    _refused(srv, ids, mask, ["lora"] * len(ids), 400, "INVALID_ARGUMENT", Code.INVALID_INPUT, text)
    errors = _with_good_traffic(srv, lambda: _grpc(srv, ids, mask, ["uni"] * len(ids)), rounds=3)
    assert all("attention_mask" in str(e) for e in errors) and errors


def test_the_merged_model_checks_tokens_too(srv):
    ids, mask = srv["ids"], srv["mask"]
    _refused(srv, _bad_token(srv, 10 ** 7), mask, None, 400, "INVALID_ARGUMENT", Code.INVALID_INPUT,
             "outside the vocabulary", model="merged1")
    zero = mask.copy()
    zero[0] = 0
    _refused(srv, ids, zero, None, 400, "INVALID_ARGUMENT", Code.INVALID_INPUT, "all zeros", model="merged1")
    assert np.abs(_grpc(srv, ids, mask, None, model="merged1") - _reference(srv["merged"], (ids, mask))).max() <= TOL


def test_wrong_dtype_and_shape(srv):
    ids, mask = srv["ids"], srv["mask"]
    names = ["uni"] * len(ids)
    # a datatype other than the config's is refused by Triton itself, before the model (no tag)
    status, body = _rest(srv, _rest_body(ids.astype(np.float32), mask, names, "FP32"))
    assert status == 400 and "input_ids" in _clean(srv, body["error"]) and parse(body["error"])[0] is None
    _refused(srv, ids, mask[:, :-1].copy(), names, 400, "INVALID_ARGUMENT", Code.INVALID_INPUT,
             "must both be [batch, seq]")
    _refused(srv, ids, mask, names[:-1], 400, "INVALID_ARGUMENT", None,  # Triton checks the batch sizes itself
             "batch size does not match other inputs")
    _refused(srv, ids[:, :0].copy(), mask[:, :0].copy(), names, 400, "INVALID_ARGUMENT", Code.INVALID_INPUT,
             "is empty")


def test_unknown_and_invalid_adapter_names(srv):
    ids, mask = srv["ids"], srv["mask"]
    _refused(srv, ids, mask, ["uni", "nope", "uni", "uni", "uni"], 404, "NOT_FOUND", Code.UNKNOWN_ADAPTER,
             "unknown adapter 'nope'")
    _refused(srv, ids, mask, ["../uni"] * len(ids), 400, "INVALID_ARGUMENT", Code.INVALID_INPUT,
             "adapter name '../uni' is invalid")
    errors = _with_good_traffic(srv, lambda: _grpc(srv, ids, mask, ["missing"] * len(ids)), rounds=3)
    assert all(e.status() == "StatusCode.NOT_FOUND" for e in errors) and errors


def test_a_sequence_over_the_maximum(srv):
    long_ids = np.full((1, 600), 1000, np.int64)
    _refused(srv, long_ids, np.ones_like(long_ids), ["uni"], 400, "INVALID_ARGUMENT", Code.INVALID_INPUT,
             "sequence length 600 exceeds the maximum 512")


# ------------------------------------------------------------------ broken packs in the store
def _copy_pack(srv, src: str, dst: str) -> tuple[Path, Path]:
    packs = srv["packs"]
    meta = json.loads((packs / f"{src}.json").read_text())
    meta["name"] = dst
    shutil.copyfile(packs / f"{src}.safetensors", packs / f"{dst}.safetensors")
    (packs / f"{dst}.json").write_text(json.dumps(meta))
    return packs / f"{dst}.safetensors", packs / f"{dst}.json"


def _until_not(call, code: Code, timeout: float = 60.0) -> str:
    """Call until the refusal's code is no longer `code` (a bounded wait in the server); the new message."""
    deadline = time.monotonic() + timeout
    while True:
        with pytest.raises(InferenceServerException) as e:
            call()
        if parse(e.value.message())[0] != code or time.monotonic() > deadline:
            return e.value
        time.sleep(0.25)


def test_a_truncated_pack_is_first_being_replaced_then_damaged(srv):
    tensors, _ = _copy_pack(srv, "uni", "trunc")
    tensors.write_bytes(tensors.read_bytes()[:-100])  # its json still records the sha256 of the whole file
    ids, mask = srv["ids"], srv["mask"]
    _refused(srv, ids, mask, ["trunc"] * len(ids), 503, "UNAVAILABLE", Code.ADAPTER_UPDATING, "being replaced; retry")
    e = _until_not(lambda: _grpc(srv, ids, mask, ["trunc"] * len(ids)), Code.ADAPTER_UPDATING)
    assert parse(e.message())[0] == Code.ADAPTER_INVALID, e.message()
    _refused(srv, ids, mask, ["trunc"] * len(ids), 500, "INTERNAL", Code.ADAPTER_INVALID,
             "its tensors do not match the sha256 its json records: the file is damaged or incomplete")
    errors = _with_good_traffic(srv, lambda: _grpc(srv, ids, mask, ["trunc"] * len(ids)), rounds=2)
    assert all("damaged" in str(e) for e in errors) and errors


def test_a_pack_file_replaced_by_a_directory_fails_its_requests_only(srv):
    tensors, _ = _copy_pack(srv, "lora", "broken")
    tensors.unlink()
    tensors.mkdir()
    ids, mask = srv["ids"], srv["mask"]
    _refused(srv, ids, mask, ["broken"] * len(ids), 500, "INTERNAL", Code.INTERNAL, "cannot be read")
    errors = _with_good_traffic(srv, lambda: _grpc(srv, ids, mask, ["broken", "uni", "lora", "comp", "uni"]),
                                rounds=2)
    assert all(e.status() == "StatusCode.INTERNAL" for e in errors) and errors


def _resized_pack(srv, src: str, dst: str, d: int) -> None:
    """A consistent pack laid out for hidden size `d` (its tensors of the shapes its sizes give, its sha256
    right, the right backbone) dropped into the store directly, bypassing the gateway's checks."""
    from safetensors.numpy import load, save
    from hpeft_serve.pack.layout import resolve_shape, spec
    packs = srv["packs"]
    meta = json.loads((packs / f"{src}.json").read_text())
    old = load((packs / f"{src}.safetensors").read_bytes())
    meta["sizes"] = meta["sizes"] | {"d": d}
    rng = np.random.default_rng(0)
    new = {k: np.array(rng.standard_normal(resolve_shape(spec()[k], meta["sizes"])) * 0.01, np.float32) for k in old}
    raw = save(new)
    meta |= {"name": dst, "sha256": hashlib.sha256(raw).hexdigest()}
    (packs / f"{dst}.safetensors").write_bytes(raw)
    (packs / f"{dst}.json").write_text(json.dumps(meta))


def test_a_pack_for_another_hidden_size_is_refused_and_the_others_answered(srv):
    from hpeft_serve.errors import CheckpointError
    from hpeft_serve.pack.store import PackStore
    _resized_pack(srv, "uni", "wide", 256)
    graph = json.loads((srv["packs"].parent / "backbone.json").read_text())
    try:  # the served graph's sizes are checked by check_pack (the pack format's owner)
        PackStore(srv["packs"], graph).load("wide")
    except CheckpointError:
        pass
    else:
        for suffix in (".json", ".safetensors"):  # never let the server see it: it would break the bank
            (srv["packs"] / f"wide{suffix}").unlink()
        pytest.fail("check_pack accepted a pack for hidden size 256 on a graph of 128")
    ids, mask = srv["ids"], srv["mask"]
    _refused(srv, ids, mask, ["wide"] * len(ids), 500, "INTERNAL", Code.ADAPTER_INVALID, "'wide'")
    errors = _with_good_traffic(srv, lambda: _grpc(srv, ids, mask, ["wide", "uni", "comp", "lora", "wide"]),
                                rounds=2)
    assert all(parse(e.message())[0] == Code.ADAPTER_INVALID for e in errors) and errors


# ------------------------------------------------------------------ in the runtime itself
class _FailingFor:
    """The real onnxruntime session, made to raise for batches holding one bank slot: a fault injected to
    reach the runtime's defence in depth (no real input makes the shared graph fail for one adapter)."""

    def __init__(self, session, slot: int):
        self.session, self.slot = session, slot

    def run(self, outputs, feed):
        if self.slot in feed["adapter_index"]:
            raise RuntimeError("injected failure")
        return self.session.run(outputs, feed)


def test_a_forward_that_raises_fails_only_the_rows_of_its_adapter(srv):
    from hpeft_serve.serving.runtime import SharedRuntime
    ids, mask = srv["ids"], srv["mask"]
    rt = SharedRuntime(srv["packs"].parent, bind_bank=False)
    names = ["uni", "comp", "lora", "comp", "uni"]
    rt.infer(ids, mask, names)
    rt.session = _FailingFor(rt.session, rt.bank._slots["comp"])
    out, errs, _ = rt.infer(ids, mask, names)
    for r, n in enumerate(names):
        if n == "comp":
            assert out[r] is None and errs[r].code is Code.INTERNAL and "'comp' failed" in _clean(srv, errs[r])
        else:
            assert errs[r] is None and np.abs(out[r] - srv["refs"][n][r]).max() <= TOL


def test_per_name_state_is_bounded_whatever_names_clients_send(srv):
    from hpeft_serve.serving.runtime import SharedRuntime
    ids, mask = srv["ids"][:1], srv["mask"][:1]
    rt = SharedRuntime(srv["packs"].parent)
    rng = np.random.default_rng(0)
    for i in range(300):  # random valid names, invalid ones, and the served ones among them
        names = [f"n{rng.integers(1 << 40)}", "bad/" + str(i), ["uni", "comp", "lora"][i % 3]]
        for n in names:
            rt.infer(ids, mask, [n])
    assert set(rt._checked) <= set(rt.bank.names()) == set(SERVED)
    assert not rt._pending


def test_a_damaged_resident_pack_leaves_its_served_version_answering(srv):
    """A resident adapter's pack truncated in place: the version being served answers, bit for bit, while
    the server waits for a complete replacement and after it has judged the files damaged."""
    from hpeft_serve.serving.runtime import SETTLE_S
    tensors, _ = _copy_pack(srv, "lora", "lora2")
    ids, mask = srv["ids"], srv["mask"]
    before = _grpc(srv, ids, mask, ["lora2"] * len(ids))
    tensors.write_bytes(tensors.read_bytes()[:-100])
    t0 = time.monotonic()
    while time.monotonic() - t0 < SETTLE_S + 0.5:
        assert np.array_equal(_grpc(srv, ids, mask, ["lora2"] * len(ids)), before)
        time.sleep(0.2)


# ------------------------------------------------------------------ through the gateway
def test_the_gateway_answers_the_models_codes_with_their_statuses(srv):
    """The same faults through the gateway (POST /v1/predict): each code's HTTP status (codes.Code.http),
    a message naming the problem and no path or stack frame, the good adapters answered."""
    from hpeft_serve.gateway import GatewayThread, Settings
    gport, = free_ports(1)
    settings = Settings(repo=str(srv["repo"]), triton=srv["grpc"],
                        triton_metrics=f"http://127.0.0.1:{srv['metrics']}/metrics")
    gw = GatewayThread(settings, "127.0.0.1", gport).start()
    try:
        def predict(name):
            return _post(f"http://127.0.0.1:{gport}/v1/predict", {"adapter": name, "inputs": ["a fine film"]})

        tensors, _ = _copy_pack(srv, "uni", "gtrunc")
        tensors.write_bytes(tensors.read_bytes()[:-100])
        broken, _ = _copy_pack(srv, "comp", "gbroken")
        broken.unlink()
        broken.mkdir()
        status, body = predict("gtrunc")
        assert status == Code.ADAPTER_UPDATING.http and "being replaced" in _clean(srv, body["error"]), body
        deadline = time.monotonic() + 60
        while status == Code.ADAPTER_UPDATING.http and time.monotonic() < deadline:
            time.sleep(0.25)
            status, body = predict("gtrunc")
        assert status == Code.ADAPTER_INVALID.http and "damaged" in _clean(srv, body["error"]), body
        status, body = predict("gbroken")
        assert status == Code.INTERNAL.http and "cannot be read" in _clean(srv, body["error"]), body
        status, body = predict("nope")
        assert status == Code.UNKNOWN_ADAPTER.http and "unknown adapter" in _clean(srv, body["error"]), body
        for n in SERVED:
            assert predict(n)[0] == 200
    finally:
        gw.stop()
