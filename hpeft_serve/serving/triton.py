"""Find and run the real NVIDIA Triton Inference Server shipped in the nvidia-pytriton wheel (2.51,
Python backend only), set up as shared/research/triton.md measured it must be:

- a backend folder holding the Python backend and the stub built for THIS Python, as symlinks (the stub
  finds Triton's libraries through its RPATH, which resolves through a symlink but not through a copy);
- LD_LIBRARY_PATH with nvidia_pytriton.libs and this Python's libpython (the stub links it);
- this virtual environment first on PATH, so the embedded, isolated interpreter of the stub uses it;
- a library check before starting: a missing library makes the server hang, so fail fast instead.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import HpeftError


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    python_backend: Path
    stub: Path
    libs: Path
    caches: Path


def locate() -> TritonInstall:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise HpeftError("tritonserver not found: install the serving extra (pip install 'hpeft-serve[serve]', "
                         "which brings nvidia-pytriton and its tritonserver binary)")
    root = Path(spec.submodule_search_locations[0]) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    inst = TritonInstall(root / "bin" / "tritonserver", root / "backends" / "python",
                         root / "python_backend_stubs" / version / "triton_python_backend_stub",
                         root.parent.parent / "nvidia_pytriton.libs", root / "caches")
    for what, path in (("tritonserver binary", inst.binary), (f"Python {version} backend stub", inst.stub),
                       ("Python backend", inst.python_backend / "libtriton_python.so")):
        if not path.exists():
            raise HpeftError(f"{what} not found at {path}: reinstall nvidia-pytriton for this Python")
    return inst


def environment(inst: TritonInstall) -> dict[str, str]:
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(inst.libs), libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.prefix) / "bin"), env.get("PATH", "")))
    return env


def backend_dir(inst: TritonInstall, work: Path) -> Path:
    """work/backends/python with the backend, its utilities and the stub, all as symlinks."""
    py = work / "backends" / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in (inst.python_backend / "libtriton_python.so", inst.python_backend / "triton_python_backend_utils.py",
                inst.stub):
        dst = py / src.name
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(src)
    return work / "backends"


def check_libraries(inst: TritonInstall, env: dict[str, str]) -> None:
    """ldd the server and the stub; a missing library is an error naming it (Triton would hang)."""
    for f in (inst.binary, inst.stub):
        out = subprocess.run(["ldd", str(f)], capture_output=True, text=True, env=env).stdout
        missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
        if missing:
            raise HpeftError(f"{f.name} cannot start: missing {', '.join(missing)} (libpython for "
                             f"Python {sys.version_info.major}.{sys.version_info.minor}: install your distribution's "
                             "libpython3.X package or use a Python built with --enable-shared)")


class TritonServer:
    """A tritonserver process on loopback; `with TritonServer(repo) as s:` starts it and stops it."""

    def __init__(self, repo: Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 work: Path | None = None, log: Path | None = None, address: str = "127.0.0.1",
                 ready_model: str = "hpeft"):
        self.repo, self.ports = Path(repo).resolve(), (http_port, grpc_port, metrics_port)
        self.work = Path(work or self.repo.parent / ".triton").resolve()
        self.log = Path(log or self.work / "tritonserver.log")
        self.address, self.ready_model = address, ready_model
        self.proc: subprocess.Popen | None = None

    def command(self, inst: TritonInstall) -> list[str]:
        http, grpc, metrics = self.ports
        return [str(inst.binary), f"--model-repository={self.repo}", f"--backend-directory={backend_dir(inst, self.work)}",
                f"--cache-directory={inst.caches}", f"--http-port={http}", f"--grpc-port={grpc}",
                f"--metrics-port={metrics}", f"--http-address={self.address}", f"--grpc-address={self.address}",
                f"--metrics-address={self.address}", "--allow-gpu-metrics=false", "--strict-readiness=false",
                "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0", "--exit-timeout-secs=5",
                "--disable-auto-complete-config", "--model-control-mode=explicit", "--load-model=*",
                "--backend-config=python,shm-default-byte-size=4194304",
                "--backend-config=python,shm-growth-byte-size=1048576"]

    def start(self, timeout: float = 120.0) -> "TritonServer":
        inst = locate()
        env = environment(inst)
        check_libraries(inst, env)
        self.work.mkdir(parents=True, exist_ok=True)
        if self.proc is not None:  # a restart: what is left of the last process goes, its log is kept
            self.reap()
            if self.log.exists():
                os.replace(self.log, self.log.with_suffix(".log.1"))
        logf = open(self.log, "w")
        self.proc = subprocess.Popen(self.command(inst), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.wait_ready(timeout)
        return self

    def url(self, path: str = "") -> str:
        return f"http://{self.address}:{self.ports[0]}{path}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HpeftError(f"tritonserver exited with status {self.proc.returncode}; last log lines:\n"
                                 + "\n".join(self.log.read_text(errors="replace").splitlines()[-15:]))
            try:
                with urllib.request.urlopen(self.url(f"/v2/models/{self.ready_model}/ready"), timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise HpeftError(f"tritonserver was not ready after {timeout:.0f}s; log: {self.log}")

    def reap(self) -> None:
        """After tritonserver died: end its process group (stub processes it left behind)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
