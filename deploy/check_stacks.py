"""The two stacks deploy/check.py runs, and the same checks on each: (a) compose.yaml + compose.cpu.yaml with
podman-compose, (b) the Kubernetes base with `podman kube play`. Every call to the gateway or to Triton comes
from a throwaway container on the stack's network (PROBE), as a client inside the deployment would make it."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml
from check_common import (ADMIN_ENV, DEPLOY, GATEWAY_IMAGE, GW_PORT, KEY_ENV, KEY_HEADER, MODEL, PORTS, ROOT,
                          TRITON_IMAGE, Podman, Results, free_port, wait_for)

TEXTS = ["A three-hour cinema master class.", "dull and far too long"]
HELLO_IDS = [101, 7592, 2088, 102]  # "hello world" in MiniLM's (and the tiny backbones') vocabulary


# ----------------------------------------------------------------------------- calls inside a stack's network
PROBE = r"""
import json, sys, urllib.request, urllib.error
out = []
for c in json.loads(sys.argv[1]):
    body = json.dumps(c["json"]).encode() if "json" in c else open(c["file"], "rb").read() if "file" in c else None
    h = dict(c.get("headers", {}), **({"Content-Type": "application/json"} if "json" in c else {}))
    req = urllib.request.Request(c["url"], data=body, headers=h, method=c.get("method", "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            out.append({"status": r.status, "body": r.read().decode(errors="replace")})
    except urllib.error.HTTPError as e:
        out.append({"status": e.code, "body": e.read().decode(errors="replace")[:2000]})
    except OSError as e:
        out.append({"status": 0, "body": repr(e)})
print(json.dumps(out))
"""


def probe(pm: Podman, network: str, exports: Path, calls: list[dict]) -> list[dict]:
    """The calls, made by a throwaway container on the stack's network (the gateway image's python)."""
    out = pm.run("run", "--rm", "--network", network, "-v", f"{exports}:/adapters:ro", "--entrypoint", "python",
                 GATEWAY_IMAGE, "-c", PROBE, json.dumps(calls), timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def predict_call(gw: str, adapter: str) -> dict:
    return {"method": "POST", "url": f"{gw}/v1/predict", "json": {"adapter": adapter, "inputs": TEXTS}}


def kserve_infer_call(triton: str, adapter: str) -> dict:
    n = len(HELLO_IDS)
    return {"method": "POST", "url": f"{triton}/v2/models/{MODEL}/infer", "json": {"inputs": [
        {"name": "input_ids", "shape": [1, n], "datatype": "INT64", "data": HELLO_IDS},
        {"name": "attention_mask", "shape": [1, n], "datatype": "INT64", "data": [1] * n},
        {"name": "adapter", "shape": [1, 1], "datatype": "BYTES", "data": [adapter]}]}}


def expect(res: dict, status: int, what: str) -> dict:
    if res["status"] != status:
        raise RuntimeError(f"{what}: {res['status']}, not {status}: {res['body'][:300]}")
    return json.loads(res["body"]) if res["body"].startswith(("{", "[")) else {}



class Stack:
    """One running deployment: its network, its containers, how its gateway and Triton are addressed."""
    name: str
    network: str
    gateway_url: str      # from inside the network
    triton_url: str       # from inside the network
    triton: str           # the Triton container
    gateway: str          # the gateway container
    host_gateway: str | None = None  # the gateway's published URL on the host, if any

    def containers(self, pm: Podman) -> list[str]:
        raise NotImplementedError


def scenario(res: Results, pm: Podman, st: Stack, exports: Path, keys: dict[str, str]) -> None:
    """The same checks on either stack."""
    S = st.name
    gw, tr = st.gateway_url, st.triton_url
    with res.step(S, "gateway /healthz 200 (Triton model ready)") as box:
        wait_for(lambda: probe(pm, st.network, exports, [{"url": f"{gw}/healthz"}])[0]["status"] == 200, 300,
                 "gateway healthy")
        box["detail"] = f"{gw}/healthz"
    if not res.rows[-1][2]:
        return  # nothing else can pass: the logs are kept (run folder)
    with res.step(S, "predict + embeddings through the gateway; KServe v2 infer on Triton") as box:
        r = probe(pm, st.network, exports, [
            predict_call(gw, "sentiment-a"),
            {"method": "POST", "url": f"{gw}/v1/embeddings", "json": {"model": "search-b", "input": TEXTS}},
            {"url": f"{tr}/v2/health/ready"}, {"url": f"{tr}/v2/models/{MODEL}"},
            kserve_infer_call(tr, "sentiment-a"), {"url": f"{gw}/v1/adapters"}])
        pred = expect(r[0], 200, "predict sentiment-a")
        emb = expect(r[1], 200, "embeddings search-b")
        expect(r[2], 200, "Triton /v2/health/ready")
        meta = expect(r[3], 200, f"Triton /v2/models/{MODEL}")
        inf = expect(r[4], 200, "KServe v2 infer")
        listed = r[5]["body"]
        assert "sentiment-a" in listed and "search-b" in listed, f"adapters listed: {listed[:200]}"
        dims = len(emb["data"][0]["embedding"])
        box["detail"] = (f"predict {len(pred.get('outputs', pred.get('predictions', [])) or TEXTS)} texts; "
                         f"embeddings {len(emb['data'])}x{dims}; v2 model {meta.get('name')} "
                         f"outputs {[o['name'] for o in inf['outputs']]}")
    with res.step(S, "Triton's model control refused without the key (REST)") as box:
        r = probe(pm, st.network, exports, [
            {"method": "POST", "url": f"{tr}/v2/repository/models/{MODEL}/load", "json": {}},
            {"method": "POST", "url": f"{tr}/v2/repository/models/{MODEL}/unload", "json": {},
             "headers": {KEY_HEADER: "wrong"}},
            {"method": "POST", "url": f"{tr}/v2/repository/index", "json": {}},
            {"method": "POST", "url": f"{tr}/v2/repository/index", "json": {}, "headers": {KEY_HEADER: keys[KEY_ENV]}}])
        got = [x["status"] for x in r]
        assert got[:3] == [403, 403, 403] and got[3] == 200, f"load/unload/index without key, index with key: {got}"
        box["detail"] = f"load, unload (wrong key), index: {got[:3]}; index with the key: {got[3]}"
    with res.step(S, "hot swap: PUT a third adapter through the gateway, then predict with it") as box:
        pack = "/adapters/c/packs/sentiment-c.safetensors"
        r = probe(pm, st.network, exports, [
            {"method": "PUT", "url": f"{gw}/v1/adapters/sentiment-c", "json": {}},  # refused before the body
            {"method": "PUT", "url": f"{gw}/v1/adapters/sentiment-c", "file": pack,
             "headers": {"Authorization": f"Bearer {keys[ADMIN_ENV]}"}},
            predict_call(gw, "sentiment-c"), kserve_infer_call(tr, "sentiment-c")])
        assert r[0]["status"] == 401, f"PUT without the admin token: {r[0]['status']}"
        assert r[1]["status"] in (200, 201), f"PUT with the token: {r[1]['status']} {r[1]['body'][:200]}"
        expect(r[2], 200, "predict sentiment-c")
        expect(r[3], 200, "KServe v2 infer sentiment-c")
        box["detail"] = f"PUT without token {r[0]['status']}, with token {r[1]['status']}; predict 200, v2 infer 200"
    with res.step(S, "Triton down (stopped; then SIGKILLed): the gateway answers 503, then recovers") as box:
        t0 = time.monotonic()
        # down and staying down (a crash restarts within a second, faster than a probe can start): stopped
        pm.run("stop", "-t", "0", st.triton)
        during = probe(pm, st.network, exports, [predict_call(gw, "sentiment-a")])[0]
        assert during["status"] == 503, f"while Triton is down: {during['status']} {during['body'][:200]}"
        pm.run("start", st.triton)
        wait_for(lambda: probe(pm, st.network, exports, [predict_call(gw, "sentiment-a")])[0]["status"] == 200,
                 300, "predict after Triton is back")
        # then a crash, not `podman kill` (podman counts that as stopped by the user: no restart)
        state = pm.inspect(st.triton)["State"]
        os.kill(int(state["Pid"]), signal.SIGKILL)
        try:  # the restart policy brings it back, as an orchestrator would
            wait_for(lambda: pm.inspect(st.triton)["State"].get("StartedAt") != state["StartedAt"], 60,
                     "restart policy", 1)
            how = f"restarted by its restart policy ({pm.inspect(st.triton)['HostConfig']['RestartPolicy']['Name']})"
        except RuntimeError:
            pm.run("start", st.triton)
            how = "not restarted by podman's restart policy: started by the check"
        wait_for(lambda: probe(pm, st.network, exports, [predict_call(gw, "sentiment-c")])[0]["status"] == 200,
                 300, "predict after the restart")
        box["detail"] = (f"503 while stopped, 200 once started; after a SIGKILL Triton {how}; predict 200 again "
                         f"({time.monotonic() - t0:.0f} s in all)")
    with res.step(S, "published on the host: only the gateway") as box:
        published = {}
        for c in st.containers(pm):
            ports = pm.inspect(c)["NetworkSettings"].get("Ports") or {}
            published[c] = sorted(f"{b['HostIp'] or '0.0.0.0'}:{b['HostPort']}->{p}" for p, bs in ports.items()
                                  for b in (bs or []))
        want_gateway = [f"{st.host_gateway.split('//')[1]}->{GW_PORT}/tcp"] if st.host_gateway else []
        bad = {c: p for c, p in published.items() if p and (c != st.gateway or p != want_gateway)}
        assert not bad and published.get(st.gateway, []) == want_gateway, f"published: {published}"
        if st.host_gateway:
            with urllib.request.urlopen(f"{st.host_gateway}/healthz", timeout=10) as r:
                assert r.status == 200
        box["detail"] = f"gateway {want_gateway}; Triton none"
    with res.step(S, "admin token absent from Triton's environment; limits; users; read-only roots") as box:
        t, g = pm.inspect(st.triton), pm.inspect(st.gateway)
        tenv, genv = t["Config"].get("Env") or [], g["Config"].get("Env") or []
        assert not any(e.startswith(f"{ADMIN_ENV}=") or keys[ADMIN_ENV] in e for e in tenv), "admin token in Triton"
        assert f"{ADMIN_ENV}={keys[ADMIN_ENV]}" in genv, "the gateway lacks the admin token"
        facts = []
        for what, c in (("triton", t), ("gateway", g)):
            hc = c["HostConfig"]
            cpus = (hc.get("NanoCpus") or 0) / 1e9 or (hc.get("CpuQuota") or 0) / max(hc.get("CpuPeriod") or 1, 1)
            mem = hc.get("Memory") or 0
            assert cpus > 0 and mem > 0, f"{what}: cpus {cpus}, memory {mem}"
            user = c["Config"].get("User") or "root"
            assert user not in ("", "0", "root", "0:0"), f"{what} runs as {user}"
            assert hc.get("ReadonlyRootfs"), f"{what}: the root filesystem is writable"
            facts.append(f"{what} {cpus:g} CPU/{mem / 2**30:g} GiB/pids {hc.get('PidsLimit') or '-'}, uid {user}, "
                         f"read-only root {hc.get('ReadonlyRootfs')}")
        box["detail"] = "; ".join(facts)
        box["ro"] = (t["HostConfig"].get("ReadonlyRootfs"), g["HostConfig"].get("ReadonlyRootfs"))


# ----------------------------------------------------------------------------- (a) compose
class ComposeStack(Stack):
    def __init__(self, pm: Podman, tool: Path, run: Path, repo: Path, base: str, keys: dict) -> None:
        self.pm, self.tool = pm, tool
        self.name = "compose"
        self.project = f"{run.name}-compose"
        self.network = f"{self.project}_default"
        port = free_port()
        self.host_gateway = f"http://127.0.0.1:{port}"
        self.gateway_url, self.triton_url = f"http://gateway:{GW_PORT}", f"http://triton:{PORTS['http']}"
        self.envfile = run / "hpeft.env"  # the keys as compose reads them: an env file only root can read
        fd = os.open(self.envfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in {
                **keys, "HPEFT_MODEL_REPOSITORY": str(repo), "HPEFT_GATEWAY_PUBLISH": f"127.0.0.1:{port}",
                "HPEFT_UID": "10001", "HPEFT_BASE_IMAGE": base}.items()))

    def compose(self, *args, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        cmd = [str(self.tool), "-p", self.project, "-f", str(DEPLOY / "compose.yaml"), "-f",
               str(DEPLOY / "compose.cpu.yaml"), "--env-file", str(self.envfile), *args]
        env = {k: v for k, v in self.pm.env.items() if not k.startswith("HPEFT_")}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
        if check and out.returncode != 0:
            raise RuntimeError(f"podman-compose {' '.join(args)}: {out.returncode}: {(out.stderr + out.stdout)[-800:]}")
        return out

    def up(self) -> str:
        self.compose("up", "-d", "--no-build")
        names = self.pm.run("ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}", "--format",
                            "{{.Names}}").stdout.split()
        self.triton = next(n for n in names if "triton" in n)
        self.gateway = next(n for n in names if "gateway" in n)
        return f"project {self.project}: {', '.join(names)}; gateway on {self.host_gateway}"

    def containers(self, pm: Podman) -> list[str]:
        return pm.run("ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}", "--format",
                      "{{.Names}}").stdout.split()

    def down(self) -> str:
        self.compose("down", "-v", "-t", "5", check=False)
        left = self.containers(self.pm)
        for c in left:
            self.pm.run("rm", "-f", c, check=False)
        self.pm.run("network", "rm", "-f", self.network, check=False)
        left += [self.network] if self.pm.exists("network", self.network) else []
        if left:
            raise RuntimeError(f"left behind: {left}")
        return "no container or network left"


# ----------------------------------------------------------------------------- (b) podman kube play
KUBE_RUNS = ("ConfigMap", "Secret", "Deployment")
KUBE_SKIPPED = "Service, HorizontalPodAutoscaler, PodDisruptionBudget, Ingress, NetworkPolicy"


def kube_manifests(repo: Path, prefix: str, gateway_port: int) -> tuple[list[dict], list[dict], str]:
    """k8s/base as podman kube play can run it on one host, the changes limited to what a one-host run needs:
    the repository a host folder (not S3), one replica, the CPU Triton image, no GPU, the Deployments and their
    podman secrets named with the run's prefix (podman's secrets are host-wide). And the ports: podman 4.3
    publishes EVERY containerPort on the host, at the same port on 0.0.0.0 (measured; Kubernetes publishes
    none), so Triton's go (nothing outside its pod needs them: the gateway reaches it by the pod's name) and
    the gateway's is published as a Service would expose it, at 127.0.0.1:gateway_port; probes name ports by
    number. podman 4.3 also makes each emptyDir a named, disk-backed, host-wide volume, root's (measured:
    Triton, uid 1000, cannot create its shared memory there), and ignores medium: Memory. So the memory-backed
    /dev/shm goes (the pod's own /dev/shm, podman's 64 MB tmpfs, serves) and every other emptyDir is a folder
    of the run (1777). Returns (objects to play, the Secrets, Triton's pod DNS name)."""
    kust = yaml.safe_load((DEPLOY / "k8s" / "base" / "kustomization.yaml").read_text())
    objs = [d for r in kust["resources"] for d in yaml.safe_load_all((DEPLOY / "k8s" / "base" / r).read_text()) if d]
    secrets_ = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "base" / "secrets.example.yaml").read_text()) if d]
    played = [copy.deepcopy(o) for o in objs if o["kind"] in KUBE_RUNS]
    triton_pod = f"{prefix}hpeft-triton-pod-0"  # podman names a Deployment's pod NAME-pod-0
    for o in played:
        if o["kind"] == "ConfigMap":
            o["data"].update({"TRITON_MODEL_REPOSITORY": "/models", "HPEFT_REPO": "/models",
                              "HPEFT_ADAPTER_STORE": f"/models/{MODEL}/1/export/packs",
                              "HPEFT_TRITON_GRPC": f"{triton_pod}:{PORTS['grpc']}"})
        if o["kind"] != "Deployment":
            continue
        o["metadata"]["name"] = prefix + o["metadata"]["name"]
        o["spec"]["replicas"] = 1
        spec = o["spec"]["template"]["spec"]
        spec.pop("tolerations", None)
        memory = {v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] not in memory]
        for v in spec["volumes"]:
            if "emptyDir" in v:
                v.pop("emptyDir")
                v["hostPath"] = {"path": str(repo.parent / f"{o['metadata']['name']}-{v['name']}"),
                                 "type": "DirectoryOrCreate"}
        for c in spec["containers"]:
            c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["name"] not in memory]
        spec["volumes"].append({"name": "models", "hostPath": {"path": str(repo), "type": "Directory"}})
        for c in spec["containers"]:
            triton = c["name"] == "tritonserver"
            named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if "httpGet" in c.get(probe, {}):
                    c[probe]["httpGet"]["port"] = named.get(c[probe]["httpGet"]["port"], c[probe]["httpGet"]["port"])
            if triton:
                c.pop("ports")
            else:
                c["ports"] = [{**p, "hostPort": gateway_port, "hostIP": "127.0.0.1"} for p in c["ports"]]
            if triton:
                c["image"] = TRITON_IMAGE
                c["resources"]["limits"].pop("nvidia.com/gpu", None)
            c["volumeMounts"].append({"name": "models", "mountPath": "/models", "readOnly": triton})
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    ref["name"] = prefix + ref["name"]
    return played, secrets_, triton_pod


def expand_vars(played: list[dict], values: dict[str, str]) -> list[dict]:
    """$(VAR) in a container's command and args, expanded from its env as the kubelet does it (podman 4.3's
    kube play leaves them as they are): values holds the Secrets' values, the ConfigMap gives the rest."""
    out = copy.deepcopy(played)
    cm = next(o for o in out if o["kind"] == "ConfigMap")["data"]
    for o in out:
        for c in o["spec"]["template"]["spec"]["containers"] if o["kind"] == "Deployment" else []:
            env = {}
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                env[e["name"]] = e.get("value") or (cm[ref["configMapKeyRef"]["key"]] if "configMapKeyRef" in ref
                                                    else values[ref["secretKeyRef"]["key"]])
            for key in ("command", "args"):
                if key in c:
                    c[key] = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in c[key]]
    return out


class KubeStack(Stack):
    def __init__(self, pm: Podman, run: Path, repo: Path, keys: dict) -> None:
        self.pm, self.run_dir, self.keys = pm, run, keys
        self.name = "kube play"
        self.prefix = f"{run.name}-"
        self.network = f"{run.name}-kube"
        port = free_port()
        self.played, self.secret_docs, self.triton_pod = kube_manifests(repo, self.prefix, port)
        self.secret_names: list[str] = []
        self.host_gateway = f"http://127.0.0.1:{port}"

    def up(self) -> str:
        values = {"HPEFT_ADMIN_TOKEN": self.keys[ADMIN_ENV], "HPEFT_TRITON_KEY": self.keys[KEY_ENV],
                  "AWS_ACCESS_KEY_ID": "unused-here", "AWS_SECRET_ACCESS_KEY": "unused-here"}
        for doc in self.secret_docs:  # podman 4.3 reads a secretKeyRef from a podman secret: JSON, key -> base64
            data = {k: base64.b64encode(values[k].encode()).decode() for k in doc["stringData"]}
            name = self.prefix + doc["metadata"]["name"]
            self.pm.run("secret", "create", name, "-", input=json.dumps(data))
            self.secret_names.append(name)
        fd = os.open(self.run_dir / "kube.yaml", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the key
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump_all(expand_vars(self.played, values), f, sort_keys=False)
        for o in self.played:  # the emptyDirs' folders, writable by the pods' users (see kube_manifests)
            for v in o["spec"]["template"]["spec"]["volumes"] if o["kind"] == "Deployment" else []:
                if v["hostPath"]["type"] == "DirectoryOrCreate":
                    Path(v["hostPath"]["path"]).mkdir(exist_ok=True)
                    os.chmod(v["hostPath"]["path"], 0o1777)
        self.pm.run("network", "create", self.network)
        self.pm.run("kube", "play", "--network", self.network, self.run_dir / "kube.yaml", timeout=600)
        pods = self.pods()
        self.triton = next(c for c in self.containers(self.pm) if c.endswith("-tritonserver"))
        self.gateway = next(c for c in self.containers(self.pm) if c.endswith("-gateway"))
        gw_pod = next(p for p in pods if "hpeft-gateway" in p)
        self.gateway_url = f"http://{gw_pod}:{GW_PORT}"
        self.triton_url = f"http://{self.triton_pod}:{PORTS['http']}"
        if self.triton_pod not in pods:
            raise RuntimeError(f"pods {pods}: none named {self.triton_pod} (the ConfigMap's HPEFT_TRITON_GRPC)")
        return f"pods {', '.join(pods)} on network {self.network}; secrets {', '.join(self.secret_names)}"

    def pods(self) -> list[str]:
        return [p for p in self.pm.run("pod", "ps", "--format", "{{.Name}}").stdout.split()
                if p.startswith(self.prefix)]

    def containers(self, pm: Podman) -> list[str]:
        names = pm.run("ps", "-a", "--format", "{{.Names}}").stdout.split()
        return [n for n in names if n.startswith(self.prefix) and not n.endswith("-infra")]

    def down(self) -> str:
        self.pm.run("kube", "down", self.run_dir / "kube.yaml", check=False)
        for p in self.pods():
            self.pm.run("pod", "rm", "-f", p, check=False)
        for s in self.secret_names:
            self.pm.run("secret", "rm", s, check=False)
        self.pm.run("network", "rm", "-f", self.network, check=False)
        left = self.pods() + [s for s in self.secret_names if self.pm.exists("secret", s)] + \
            ([self.network] if self.pm.exists("network", self.network) else [])
        if left:
            raise RuntimeError(f"left behind: {left}")
        return "no pod, secret or network left"
