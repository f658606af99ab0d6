"""What deploy/check.py's steps share: the names and ports it takes from deploy/ (contract.yaml, compose,
the images' tags), podman run with this check's own containers.conf, and the table of results."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONTRACT = yaml.safe_load((DEPLOY / "contract.yaml").read_text())
BASE_IMAGE = "localhost/debian:bookworm-minbase"
TRITON_IMAGE = "hpeft-serve/triton-cpu:0.1.0"   # compose.cpu.yaml's image
GATEWAY_IMAGE = "hpeft-serve/gateway:0.1.0"     # compose.yaml's and k8s/base/gateway.yaml's image
CONTAINERS_CONF = """[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""
MODEL = CONTRACT["triton"]["model"]
PORTS = CONTRACT["triton"]["ports"]
GW_PORT = CONTRACT["gateway"]["port"]
KEY_HEADER = CONTRACT["triton"]["restricted"]["header"]
ADMIN_ENV = CONTRACT["gateway"]["env"]["admin_token"]
KEY_ENV = CONTRACT["triton"]["restricted"]["key_env"]


# ----------------------------------------------------------------------------- results
class Results:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, bool, float, str]] = []

    @contextlib.contextmanager
    def step(self, stack: str, what: str):
        """A timed row; an exception fails the row (and the run), with its message as the detail."""
        t0, box = time.monotonic(), {"detail": ""}
        try:
            yield box
            ok = box.get("ok", True)
        except Exception as e:  # noqa: BLE001 - every failure becomes a row
            ok, box["detail"] = False, f"{type(e).__name__}: {e}"[:300]
        self.rows.append((stack, what, ok, time.monotonic() - t0, box["detail"]))
        print(f"[{'PASS' if ok else 'FAIL'}] {stack}: {what} ({time.monotonic() - t0:.1f} s) {box['detail']}",
              flush=True)
        if not ok and box.get("fatal"):
            raise SystemExit(self.table())

    def check(self, stack: str, what: str, ok: bool, detail: str) -> None:
        self.rows.append((stack, what, ok, 0.0, detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {stack}: {what} {detail}", flush=True)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r[2] for r in self.rows)

    def table(self) -> str:
        lines = ["| stack | check | result | s | detail |", "|---|---|---|---:|---|"]
        lines += [f"| {s} | {w} | {'PASS' if ok else '**FAIL**'} | {t:.1f} | {d.replace('|', '/')} |"
                  for s, w, ok, t, d in self.rows]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- podman
class Podman:
    def __init__(self, state: Path) -> None:
        conf = state / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def run(self, *args, check: bool = True, timeout: float = 600, input: str | None = None,
            nice: bool = False) -> subprocess.CompletedProcess:
        cmd = (["nice", "-n", "10"] if nice else []) + ["podman", *map(str, args)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout, input=input)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {out.returncode}: "
                               f"{(out.stderr or out.stdout).strip()[-600:]}")
        return out

    def inspect(self, name: str) -> dict:
        return json.loads(self.run("container", "inspect", name).stdout)[0]

    def exists(self, kind: str, name: str) -> bool:
        return self.run(kind, "exists", name, check=False).returncode == 0



def wait_for(fn, timeout: float, what: str, every: float = 2.0):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            got = fn()
            if got:
                return got
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(every)
    raise RuntimeError(f"{what}: not after {timeout:.0f} s ({last})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
