"""Find and run the real NVIDIA Triton Inference Server shipped in the nvidia-pytriton wheel (2.51,
Python backend only), set up as shared/research/triton.md measured it must be, and locked down:

- a backend folder holding the Python backend and the stub built for THIS Python, as symlinks (the stub
  finds Triton's libraries through its RPATH, which resolves through a symlink but not through a copy);
- LD_LIBRARY_PATH with nvidia_pytriton.libs and this Python's libpython (the stub links it);
- this virtual environment first on PATH, so the embedded, isolated interpreter of the stub uses it;
- a library check before starting: a missing library makes the server hang, so fail fast instead;
- its ports on loopback only and checked free before it starts (a stale server would answer instead);
- state-changing APIs (model repository, shared memory, trace, logging) behind a key header, over HTTP
  and gRPC; the key is HPEFT_TRITON_KEY or a random one, kept in a 0600 file per port (key_file) for
  `hpeft deploy --url` on this host; no HPEFT_* variable (admin token, key) in its or its stubs' environment;
- it dies with the process that started it (PR_SET_PDEATHSIG, from a thread that outlives it);
- its Python-backend shared-memory regions under a prefix of its own, 0600, removed when it stops or restarts.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import HpeftError
from .client import TRITON_KEY_ENV, TRITON_KEY_HEADER

LOOPBACK = "127.0.0.1"
RESTRICTED = "model-repository,shared-memory,trace,logging"
SHM = Path("/dev/shm")
PR_SET_PDEATHSIG = 1


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
    """This process's environment less every HPEFT_* variable (the admin token, the Triton key: the model
    reads its settings from config.pbtxt, never from the environment), plus the library and PATH setup."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPEFT_")}
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


def check_ports_free(ports: dict[str, int], address: str = LOOPBACK) -> None:
    """Each named port can be bound on `address`, else an error naming it (what holds it would answer)."""
    for what, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no obstacle
            try:
                s.bind((address, port))
            except OSError as e:
                raise HpeftError(f"port {port} ({what}) on {address} is already in use ({e.strerror}): stop "
                                 "what listens there or choose another port") from None


# ---------------------------------------------------------------- the key of the restricted APIs
def new_key() -> str:
    """HPEFT_TRITON_KEY if set (checked: it goes into a flag and a header), else a random key."""
    key = os.environ.get(TRITON_KEY_ENV, "")
    if not key:
        return secrets.token_hex(24)
    if not re.fullmatch(r"[A-Za-z0-9._~-]+", key):
        raise HpeftError(f"{TRITON_KEY_ENV} may hold only letters, digits and . _ ~ - (it is sent as a header)")
    return key


def key_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or str(Path.home() / ".cache")
    return Path(base) / "hpeft" / "triton-keys"


def key_file(port: int) -> Path:
    """Where a TritonServer on this host keeps its key for one of its ports (0600, in a 0700 folder)."""
    return key_dir() / f"port-{port}.key"


def find_key(url: str) -> str | None:
    """The key for the server at HOST:PORT: HPEFT_TRITON_KEY, else (a local host) the key file of that port."""
    if os.environ.get(TRITON_KEY_ENV):
        return os.environ[TRITON_KEY_ENV]
    host, _, port = url.rpartition(":")
    if host.strip("[]") not in ("localhost", LOOPBACK, "::1", "") or not port.isdigit():
        return None
    try:
        return key_file(int(port)).read_text().strip() or None
    except OSError:
        return None


def _write_key(key: str, ports: tuple[int, ...]) -> None:
    key_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(key_dir(), 0o700)
    for port in ports:
        f = key_file(port)
        tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key)
        os.replace(tmp, f)


def _remove_key(key: str, ports: tuple[int, ...]) -> None:
    for port in ports:  # only our own: a later server on the port may have written its key since
        f = key_file(port)
        try:
            if f.read_text().strip() == key:
                f.unlink()
        except OSError:
            pass


def _die_with_parent(parent: int):
    """A preexec_fn: SIGKILL this child when the thread that forked it ends (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before prctl: nobody would signal us
            os._exit(1)
    return preexec


class TritonServer:
    """A tritonserver process on loopback; `with TritonServer(repo) as s:` starts it and stops it.
    `key` is the key of its restricted APIs (send client.triton_key_headers(s.key)); `shm_prefix` names
    its shared-memory regions."""

    def __init__(self, repo: Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 work: Path | None = None, log: Path | None = None, ready_model: str = "hpeft",
                 key: str | None = None):
        self.repo, self.ports = Path(repo).resolve(), (http_port, grpc_port, metrics_port)
        self.work = Path(work or self.repo.parent / ".triton").resolve()
        self.log = Path(log or self.work / "tritonserver.log")
        self.address, self.ready_model = LOOPBACK, ready_model
        self.key = key or new_key()
        # one prefix per work folder and port: a server killed together with its stubs leaves its regions
        # behind, and the next server here (the port is free, so that one is gone) removes them
        self.shm_prefix = f"hpeft_{hashlib.sha256(str(self.work).encode()).hexdigest()[:12]}_{http_port}_"
        self.proc: subprocess.Popen | None = None
        self._reaped = False

    def command(self, inst: TritonInstall) -> list[str]:
        http, grpc, metrics = self.ports
        return [str(inst.binary), f"--model-repository={self.repo}", f"--backend-directory={backend_dir(inst, self.work)}",
                f"--cache-directory={inst.caches}", f"--http-port={http}", f"--grpc-port={grpc}",
                f"--metrics-port={metrics}", f"--http-address={self.address}", f"--grpc-address={self.address}",
                f"--metrics-address={self.address}", "--allow-gpu-metrics=false", "--strict-readiness=false",
                "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0", "--exit-timeout-secs=5",
                "--disable-auto-complete-config", "--model-control-mode=explicit", "--load-model=*",
                f"--http-restricted-api={RESTRICTED}:{TRITON_KEY_HEADER}={self.key}",
                f"--grpc-restricted-protocol={RESTRICTED}:{TRITON_KEY_HEADER}={self.key}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
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
        check_ports_free(dict(zip(("Triton HTTP", "Triton gRPC", "Triton metrics"), self.ports)))
        self.free_regions()
        _write_key(self.key, self.ports[:2])
        self.proc, self._reaped = self._spawn(self.command(inst), env), False
        self.wait_ready(timeout)
        self.secure_regions()
        return self

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Popen with PR_SET_PDEATHSIG, which fires when the forking THREAD ends: from the main thread (it
        lasts as long as this process), else from a thread that waits on tritonserver as long as it runs."""
        def popen() -> subprocess.Popen:
            with open(self.log, "w") as logf:
                return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, umask=0o077,
                                        start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
        if threading.current_thread() is threading.main_thread():
            return popen()
        started, box = threading.Event(), {}

        def run() -> None:
            try:
                box["proc"] = popen()
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                box["error"] = e
                return
            finally:
                started.set()
            box["proc"].wait()
        threading.Thread(target=run, name="tritonserver-parent", daemon=True).start()
        started.wait()
        if "error" in box:
            raise box["error"]
        return box["proc"]

    def url(self, path: str = "") -> str:
        return f"http://{self.address}:{self.ports[0]}{path}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.reap()
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

    # ------------------------------------------------------------ shared memory of the Python backend
    def regions(self) -> list[Path]:
        """This server's shared-memory regions (one per stub), by its prefix: never another server's."""
        return sorted(SHM.glob(f"{self.shm_prefix}*"))

    def free_regions(self) -> None:
        for f in self.regions():
            f.unlink(missing_ok=True)

    def secure_regions(self) -> None:
        """0600 for this server's regions: the backend sets 0644 itself, whatever the umask (measured),
        so this runs after the start and on every watch tick of `hpeft serve` (a reload makes new ones)."""
        for f in self.regions():
            try:
                os.chmod(f, 0o600)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------ ending
    def reap(self, timeout: float = 10.0) -> None:
        """After tritonserver died: end its process group (the stubs it left behind), wait until the group
        is gone, then free the shared memory they held. Once only: the group's id may be reused later."""
        if self._reaped:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.05)
        self._reaped = True
        self.free_regions()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.reap()
        _remove_key(self.key, self.ports[:2])

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
