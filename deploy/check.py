"""`make deploy-check`: build the images with podman and run the shipped deployment for real, on one host.

1. podman, runc and debootstrap (apt-get, as root, when missing); podman runs with a containers.conf this
   script writes (CONTAINERS_CONF; nothing under /etc changes).
2. A base image: --base-image, else localhost/debian:bookworm-minbase, made with debootstrap when absent.
3. The images: docker/triton-cpu.Dockerfile (the nvidia-pytriton wheel's tritonserver, no NGC pull) and
   docker/gateway.Dockerfile, built with `podman build` (the host's CA bundle, where pip needs it, as a build
   secret only), then checked: a non-root user, no torch, no build-time CA file or pip.conf in any layer.
4. Three tiny adapters (tiny-bert LoRA: two classifiers, one embedder), trained and exported with this
   checkout's `hpeft`; two are deployed into a model repository, the third is uploaded later.
5. Each stack, (a) compose.yaml + compose.cpu.yaml with podman-compose (from PyPI, in a tool venv), and (b)
   the Kubernetes base (ConfigMap, Secrets, both Deployments) with `podman kube play`:
   the gateway's predict and /v1/embeddings and Triton's KServe v2 endpoint, called from a container inside
   the stack's network; Triton's model control refused without the key; a third adapter hot-swapped in
   through the gateway (PUT); Triton's container killed: the gateway answers 503, then recovers; what is
   published on the host (compose: only the gateway; kube play: nothing, Services are not run); the admin
   token in no Triton environment; limits, users and read-only root filesystems; then everything is removed.
Every name starts hpeft-check-<random> (containers, pods, networks, podman secrets), the gateway's host port
is a free random one, and everything is torn down, also on failure. It prints a table and exits 1 on any
failure. Run as root (podman here is rootful): `make deploy-check`, or `.venv/bin/python deploy/check.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from check_common import ADMIN_ENV, BASE_IMAGE, GATEWAY_IMAGE, KEY_ENV, ROOT, TRITON_IMAGE, Podman, Results
from check_stacks import KUBE_SKIPPED, ComposeStack, KubeStack, scenario

HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_PIP_CONF = Path("/etc/pip.conf")
ADAPTERS = {  # name: (task, seed); all tiny-bert LoRA, so all fit one shared graph
    "sentiment-a": ("rotten_tomatoes", 1), "search-b": ("bbc_retrieval", 2), "sentiment-c": ("rotten_tomatoes", 3)}


def ensure_tools() -> None:
    missing = [p for p, exe in (("podman", "podman"), ("runc", "runc"), ("debootstrap", "debootstrap"))
               if shutil.which(exe) is None and not Path(f"/usr/sbin/{exe}").exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing {', '.join(missing)}: run as root (apt-get install -y podman runc debootstrap)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "podman", "runc", "debootstrap"], check=True, env=env)


def tool_venv(state: Path) -> Path:
    """podman-compose from PyPI, in a venv of its own (state/tools)."""
    exe = state / "tools" / "bin" / "podman-compose"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(state / "tools")], check=True)
        subprocess.run([str(state / "tools" / "bin" / "pip"), "install", "-q", "podman-compose==1.6.0"], check=True)
    return exe


def make_base(pm: Podman, state: Path, base: str) -> str:
    if pm.exists("image", base):
        return f"{base} (present)"
    if base != BASE_IMAGE:
        raise RuntimeError(f"base image {base} not found (only {BASE_IMAGE} is made here)")
    rootfs = state / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    subprocess.run(["nice", "-n", "10", "debootstrap", "--variant=minbase", "bookworm", str(rootfs)], check=True,
                   capture_output=True, timeout=1200)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "-", base], stdin=tar.stdout, check=True, env=pm.env, capture_output=True)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    return f"{base} made by debootstrap --variant=minbase bookworm"


def build(pm: Podman, dockerfile: str, tag: str, base: str) -> str:
    args = ["build", "--format", "docker", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",  # docker:
            "-f", f"deploy/docker/{dockerfile}", "-t", tag]  # the format that keeps HEALTHCHECK
    if HOST_CA.exists():  # pip here needs the host's CA bundle: a build secret, never in a layer
        args += ["--secret", f"id=pip_cert,src={HOST_CA}"]
    pm.run(*args, str(ROOT), nice=True, timeout=3600)
    size = int(json.loads(pm.run("image", "inspect", tag).stdout)[0]["Size"])
    return f"{tag}, {size / 1e6:.0f} MB"


def image_problems(pm: Podman, tag: str, user: str) -> list[str]:
    """Non-root user, no torch, and none of the build's CA file or pip.conf (same bytes) anywhere in it."""
    problems = []
    cfg = json.loads(pm.run("image", "inspect", tag).stdout)[0]["Config"]
    if str(cfg.get("User")) != user:
        problems.append(f"user {cfg.get('User')!r}, not {user}")
    if any(e.split("=", 1)[0] in ("PIP_CERT", "PIP_CONFIG_FILE", "REQUESTS_CA_BUNDLE") for e in cfg.get("Env", [])):
        problems.append("a pip/CA setting in the image's environment")
    banned = {}
    for f in (HOST_CA, HOST_PIP_CONF):
        if f.exists():
            data = f.read_bytes()
            banned[len(data)] = banned.get(len(data), set()) | {hashlib.sha256(data).hexdigest()}
    mnt = Path(pm.run("image", "mount", tag).stdout.strip())
    try:
        for dirpath, _, files in os.walk(mnt):
            for name in files:
                p = Path(dirpath) / name
                if name == "pip.conf":
                    problems.append(f"{p.relative_to(mnt)} in the image")
                with contextlib.suppress(OSError):
                    if not p.is_symlink() and p.stat().st_size in banned and \
                            hashlib.sha256(p.read_bytes()).hexdigest() in banned[p.stat().st_size]:
                        problems.append(f"the build host's {p.name} at /{p.relative_to(mnt)}")
        if list(mnt.glob("opt/hpeft/lib/python3*/site-packages/torch")):
            problems.append("torch installed")
    finally:
        pm.run("image", "unmount", tag, check=False)
    return problems


# ----------------------------------------------------------------------------- adapters
def hpeft(*args) -> None:
    exe = Path(sys.executable).parent / "hpeft"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(["nice", "-n", "10", str(exe), *map(str, args)], check=True, env=env, capture_output=True,
                   timeout=1800)


def make_adapters(work: Path) -> Path:
    """runs/ and exports/: sentiment-a + search-b in exports/shared (deployed), sentiment-c in exports/c."""
    done = work / "exports" / ".done"
    if done.exists():
        return work / "exports"
    shutil.rmtree(work / "exports", ignore_errors=True)
    for name, (task, seed) in ADAPTERS.items():
        run = work / "runs" / name
        if not (run / "adapter_config.json").exists():
            hpeft("train", "--backbone", "tiny-bert", "--method", "lora", "--task", task, "--train-size", 48,
                  "--eval-size", 32, "--seed", seed, "--out", run, "--quiet")
        hpeft("export", run, "--out", work / "exports" / ("c" if name == "sentiment-c" else "shared"))
    done.touch()
    return work / "exports"


def model_repository(exports: Path, repo: Path) -> Path:
    """hpeft deploy of the two adapters into a fresh repository, owned by the gateway's uid (it writes packs;
    Triton, uid 1000, reads them: the store writes 0644)."""
    shutil.rmtree(repo, ignore_errors=True)
    hpeft("deploy", exports / "shared", "--repo", repo)
    for dirpath, dirs, files in os.walk(repo):
        for n in [*dirs, *files, "."]:
            p = Path(dirpath) / n
            os.chown(p, 10001, 10001)
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    os.chmod(repo.parent, 0o755)
    return repo


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-image", default=BASE_IMAGE, help=f"the images' base (default {BASE_IMAGE}, made "
                    "with debootstrap when absent; python:3.11-slim where a registry is reachable)")
    ap.add_argument("--state", type=Path, default=Path(os.environ.get("HPEFT_CHECK_DIR", "/var/tmp/hpeft-check")),
                    help="where the tool venv, the adapters and each run's files go")
    ap.add_argument("--only", choices=["compose", "kube"], help="run one stack only")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # torn down on TERM as on Ctrl-C
    ensure_tools()
    args.state.mkdir(parents=True, exist_ok=True)
    run = args.state / f"hpeft-check-{secrets.token_hex(3)}"
    run.mkdir()
    pm, res = Podman(args.state), Results()
    keys = {ADMIN_ENV: secrets.token_hex(24), KEY_ENV: secrets.token_hex(24)}
    with res.step("setup", "podman-compose in a tool venv") as box:
        box["fatal"] = True
        tool = tool_venv(args.state)
        box["detail"] = subprocess.run([str(tool), "--version"], capture_output=True, text=True,
                                       env=pm.env).stdout.replace("\n", "; ").strip("; ")
    with res.step("setup", "base image") as box:
        box["fatal"] = True
        box["detail"] = make_base(pm, args.state, args.base_image)
    for dockerfile, tag, user in (("triton-cpu.Dockerfile", TRITON_IMAGE, "1000"),
                                  ("gateway.Dockerfile", GATEWAY_IMAGE, "10001")):
        with res.step("build", f"podman build {dockerfile}") as box:
            box["fatal"] = True
            box["detail"] = build(pm, dockerfile, tag, args.base_image)
        with res.step("build", f"{tag}: non-root, no torch, no build-time CA file or pip.conf") as box:
            problems = image_problems(pm, tag, user)
            assert not problems, "; ".join(problems)
            box["detail"] = f"user {user}; none of the host's CA bundle or pip.conf in any file"
    with res.step("setup", "three tiny adapters trained and exported (hpeft train/export)") as box:
        box["fatal"] = True
        exports = make_adapters(args.state / "adapters")
        box["detail"] = ", ".join(ADAPTERS)
    stacks = []
    if args.only in (None, "compose"):
        stacks.append(lambda repo: ComposeStack(pm, tool, run, repo, args.base_image, keys))
    if args.only in (None, "kube"):
        stacks.append(lambda repo: KubeStack(pm, run, repo, keys))
    for make in stacks:
        repo = model_repository(exports, run / f"repo-{len(res.rows)}")
        st = make(repo)
        try:
            with res.step(st.name, "up") as box:
                box["detail"] = st.up()
            if res.rows[-1][2]:
                scenario(res, pm, st, exports, keys)
        finally:
            with contextlib.suppress(Exception):  # the containers' logs, kept in the run folder
                for c in st.containers(pm):
                    out = pm.run("logs", "--timestamps", c, check=False)
                    (run / f"{c}.log").write_text(out.stdout + out.stderr)
            with res.step(st.name, "torn down") as box:
                box["detail"] = st.down()
    if args.only in (None, "kube"):
        res.check("kube play", "not run by podman kube play", True, f"{KUBE_SKIPPED} (k8s/base); the colocated "
                  "overlay, k8s/monitoring and KServe")
    print("\n" + res.table())
    (run / "result.md").write_text(res.table() + "\n")
    print(f"\n{'PASS' if res.ok else 'FAIL'}: {sum(r[2] for r in res.rows)}/{len(res.rows)} checks; "
          f"files in {run}")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
