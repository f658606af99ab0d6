"""tritonserver as a process, real and started here: its model control is refused without the key (over
HTTP and gRPC; an uploaded model's code never runs, model `hpeft` is never reloaded from another store),
and works with it; neither secret is in its or its stubs' environment. Under `hpeft serve`, the KServe
request that crashes tritonserver 2.51 brings it down as often as it is sent, and it always comes back and
answers right (the gateway, the public face, refuses that request); its shared-memory regions are its own,
0600, and freed on a restart; kill -9 of `hpeft serve` takes tritonserver and its stubs with it and frees the
ports; a port in use is a clear error at start."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from exporters.export import export_checkpoint
from hpeft_serve.cli import main
from hpeft_serve.serving.client import TRITON_KEY_ENV, free_ports, hpeft_inputs, triton_key_headers
from hpeft_serve.serving.deploy import deploy
from hpeft_serve.serving.triton import TritonServer, find_key

from .test_export import _batches, _make_ckpt, _reference

TOL = 1e-5
TOKEN = "process-test-admin-token"
HPEFT = Path(sys.executable).with_name("hpeft")
CRASH = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 137438953472], "data": [1, 2]},
                    {"name": "attention_mask", "datatype": "INT64", "shape": [1, 2], "data": [1, 1]},
                    {"name": "adapter", "datatype": "BYTES", "shape": [1, 1], "data": ["uni"]}]}
MODEL_PY = """import os, json
class TritonPythonModel:
    def initialize(self, args):
        open({marker!r}, "w").write(json.dumps(dict(os.environ)))
    def execute(self, requests):
        return []
"""
UPLOAD_CONFIG = {"name": "evil", "backend": "python", "max_batch_size": 0,
                 "input": [{"name": "x", "data_type": "TYPE_INT64", "dims": [1]}],
                 "output": [{"name": "y", "data_type": "TYPE_INT64", "dims": [1]}]}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("process")
    ck = _make_ckpt(tiny_bert, "unipelt", root / "ck" / "uni", seed=0)
    export_checkpoint(ck, root / "export", "onnx", log=lambda *_: None)
    deploy(root / "export", root / "repo", log=lambda *_: None)
    return {"root": root, "repo": root / "repo", "ck": ck}


def _answer_is_right(grpc_url: str, ck) -> None:
    ids, mask = (t.numpy() for t in _batches()[0])
    client = grpcclient.InferenceServerClient(grpc_url)
    got = client.infer("hpeft", hpeft_inputs(grpcclient, ids, mask, ["uni"] * len(ids))).as_numpy("logits")
    assert np.abs(got - _reference(ck, (ids, mask))).max() <= TOL


def _post(url: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _environ(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def _named(pids: list[int], name: str) -> list[int]:
    return [p for p in pids if name in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _until(cond, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds:.0f}s: {what}")


# ---------------------------------------------------------------- take-over
def test_model_control_needs_the_key(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("HPEFT_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv(TRITON_KEY_ENV, "process-test-triton-key")
    http, grpc, metrics = free_ports()
    with TritonServer(repo["repo"], http, grpc, metrics, work=tmp_path / "work") as server:
        assert server.key == "process-test-triton-key"
        marker = tmp_path / "marker.json"
        files = {"file:1/model.py": MODEL_PY.format(marker=str(marker)).encode()}
        load = {"parameters": {"config": json.dumps(UPLOAD_CONFIG),
                               "file:1/model.py": base64.b64encode(files["file:1/model.py"]).decode()}}
        code, text = _post(server.url("/v2/repository/models/evil/load"), load)
        assert code == 403 and "restricted" in text, (code, text)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.load_model("evil", config=json.dumps(UPLOAD_CONFIG), files=files)
        with pytest.raises(InferenceServerException, match="restricted"):  # a wrong key is no key
            client.load_model("evil", config=json.dumps(UPLOAD_CONFIG), files=files,
                              headers=triton_key_headers("guess"))
        # model hpeft reloaded from another store: refused both ways, and it serves as before
        other = json.dumps({**client.get_model_config("hpeft", as_json=True)["config"],
                            "parameters": {"ADAPTER_STORE": {"string_value": str(tmp_path)}}})
        code, text = _post(server.url("/v2/repository/models/hpeft/load"), {"parameters": {"config": other}})
        assert code == 403 and "restricted" in text, (code, text)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.load_model("hpeft", config=other)
        for what in ("/v2/repository/index", "/v2/systemsharedmemory/status", "/v2/trace/setting", "/v2/logging"):
            assert _post(server.url(what), {})[0] == 403, what
        _answer_is_right(f"127.0.0.1:{grpc}", repo["ck"])
        assert not marker.exists()  # the refused upload's code never ran

        # with the key: the same upload loads, and what its code sees holds neither secret
        client.load_model("evil", config=json.dumps(UPLOAD_CONFIG), files=files, headers=triton_key_headers(server.key))
        seen = json.loads(marker.read_text())
        assert "HPEFT_ADMIN_TOKEN" not in seen and TRITON_KEY_ENV not in seen
        assert TOKEN not in json.dumps(seen) and server.key not in json.dumps(seen)
        client.unload_model("evil", headers=triton_key_headers(server.key))
        for pid in [server.proc.pid] + _named(_children(server.proc.pid), "triton_python_backend_stub"):
            assert TOKEN not in _environ(pid) and server.key not in _environ(pid), pid


# ---------------------------------------------------------------- `hpeft serve` as a process
class Serve:
    """`hpeft serve` started as a user runs it (gateway on all interfaces, Triton on loopback)."""

    def __init__(self, repo: Path, ports: list[int], log: Path):
        self.ports, self.log = ports, log
        http, grpc, metrics, gport = ports
        self.grpc, self.gateway = f"127.0.0.1:{grpc}", f"http://127.0.0.1:{gport}"
        self.proc = subprocess.Popen([str(HPEFT), "serve", "--repo", str(repo), "--http-port", str(http),
                                      "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--gateway-port",
                                      str(gport), "--address", "0.0.0.0", "--max-restart-delay", "2"],
                                     env={k: v for k, v in os.environ.items() if k != TRITON_KEY_ENV} | {
                                         "HPEFT_ADMIN_TOKEN": TOKEN},
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        _until(self.healthy, 180, f"hpeft serve healthy; log:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text()

    def healthy(self) -> bool:
        assert self.proc.poll() is None, self.text()
        try:
            with urllib.request.urlopen(f"{self.gateway}/healthz", timeout=5) as r:
                return r.status == 200 and self.text().count("tritonserver is back") >= self.text().count("restarting")
        except OSError:
            return False

    def triton(self) -> int:
        (pid,) = _named(_children(self.proc.pid), "tritonserver")
        return pid

    def stubs(self) -> list[int]:
        return _named(_children(self.triton()), "triton_python_backend_stub")

    def regions(self) -> list[Path]:
        cmd = Path(f"/proc/{self.triton()}/cmdline").read_text().split("\0")
        flag = "--backend-config=python,shm-region-prefix-name="
        (prefix,) = [a.removeprefix(flag) for a in cmd if a.startswith(flag)]
        return sorted(Path("/dev/shm").glob(f"{prefix}*"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(60) == 0


@pytest.fixture(scope="module")
def serve(repo):
    s = Serve(repo["repo"], free_ports(4), repo["root"] / "serve.log")
    yield s
    s.stop()


def _listening(port: int) -> set[str]:
    """The local addresses that TCP sockets on `port` listen on (/proc/net/tcp and tcp6; v4-mapped as v4)."""
    import ipaddress
    out = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            (ip, p), state = line.split()[1].split(":"), line.split()[3]
            if state != "0A" or int(p, 16) != port:
                continue
            raw = b"".join(bytes.fromhex(ip[i:i + 8])[::-1] for i in range(0, len(ip), 8))
            addr = ipaddress.ip_address(raw)
            out.add(str(getattr(addr, "ipv4_mapped", None) or addr))
    return out


def test_triton_is_on_loopback_and_secrets_stay_out(serve, repo):
    http, grpc, metrics, gport = serve.ports
    assert _listening(gport) == {"0.0.0.0"}  # --address is the gateway's
    for port in (http, grpc, metrics):
        assert _listening(port) == {"127.0.0.1"}, port
    key = find_key(serve.grpc)  # a random key (HPEFT_TRITON_KEY unset), found through its key file
    assert key and key not in serve.text()
    for pid in [serve.triton()] + serve.stubs():
        assert TOKEN not in _environ(pid) and key not in _environ(pid), pid
    client = grpcclient.InferenceServerClient(serve.grpc)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_model_repository_index()
    assert client.get_model_repository_index(headers=triton_key_headers(key), as_json=True)["models"]


def test_the_crash_request_never_brings_the_service_down(serve, repo):
    """SIGKILL once, then the crash request 5 times straight to Triton's loopback port: each time it dies,
    comes back (regions of the dead one freed, the new ones 0600) and answers right; through the gateway
    the same request is refused and crashes nothing."""
    http = serve.ports[0]
    for round_ in range(6):
        old_pid, old_regions = serve.triton(), serve.regions()
        assert old_regions and all(f.stat().st_mode & 0o777 == 0o600 for f in old_regions)
        if round_ == 0:
            os.kill(old_pid, signal.SIGKILL)
        else:
            with pytest.raises(OSError):  # the connection drops: tritonserver aborted (std::bad_alloc)
                _post(f"http://127.0.0.1:{http}/v2/models/hpeft/infer", CRASH)
        _until(lambda: not _alive(old_pid), 30, "tritonserver died")
        _until(serve.healthy, 120, f"tritonserver back; log:\n{serve.text()}")
        _answer_is_right(serve.grpc, repo["ck"])
        assert not set(old_regions) & set(serve.regions())
        assert not any(f.exists() for f in old_regions)
        assert all(f.stat().st_mode & 0o777 == 0o600 for f in serve.regions())
    assert serve.text().count("tritonserver is back") == 6 and "giving up" not in serve.text()
    delays = [line.split(" in ")[1].split("s ")[0] for line in serve.text().splitlines() if "restarting it in" in line]
    assert delays == ["1", "2", "2", "2", "2", "2"]  # back-off: doubling, up to --max-restart-delay
    pid = serve.triton()
    for path in ("/v2/models/hpeft/infer", "/v1/predict"):  # the public face has no raw tensor input
        code, text = _post(f"{serve.gateway}{path}", CRASH)
        assert 400 <= code < 500, (path, code, text)
    assert serve.triton() == pid and serve.healthy()
    _answer_is_right(serve.grpc, repo["ck"])


def test_kill_9_of_hpeft_serve_takes_tritonserver_with_it(serve, repo, capsys):
    triton, stubs, regions = serve.triton(), serve.stubs(), serve.regions()
    assert stubs and regions
    os.kill(serve.proc.pid, signal.SIGKILL)
    serve.proc.wait()
    _until(lambda: not any(_alive(p) for p in [triton, *stubs]), 30, "tritonserver and its stubs gone")
    _until(lambda: all(_port_free(p) for p in serve.ports), 30, "ports free")
    again = Serve(repo["repo"], serve.ports, repo["root"] / "serve2.log")  # the same ports serve again
    try:
        assert not any(f.exists() for f in regions)
        _answer_is_right(again.grpc, repo["ck"])
        for i, port in enumerate(serve.ports):  # a second server on any of these ports: refused at start
            ports = free_ports(4)
            ports[i] = port
            code = main(["serve", "--repo", str(repo["repo"]), "--http-port", str(ports[0]), "--grpc-port",
                         str(ports[1]), "--metrics-port", str(ports[2]), "--gateway-port", str(ports[3])])
            err = capsys.readouterr().err
            assert code == 2 and f"port {port} " in err and "in use" in err, (port, err)
        assert again.healthy() and again.triton()
    finally:
        again.stop()
