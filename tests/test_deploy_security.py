"""deploy/ hardened against take-over and crash requests (issue 10), checked offline. Rules, each a function
that lists the problems it finds and each shown to catch a mutated copy of the real files:
- every tritonserver command line (compose, the Triton Dockerfile, Kubernetes base and colocated, KServe)
  restricts Triton's state-changing APIs to holders of a key that comes from a secret or a required variable,
  never a literal (--http-restricted-api / --grpc-restricted-protocol, as deploy/contract.yaml says);
- compose publishes the gateway's port only; Kubernetes keeps Triton ClusterIP, behind a NetworkPolicy, and on
  the pod's loopback where the gateway shares its pod (colocated), with probes that still reach it;
- the admin token is in no Triton container's environment;
- every container has cpu and memory limits;
- the Python side (hpeft_serve.serving.client, `hpeft serve`'s command line, the gateway's settings) names the
  same APIs, header and variable.
With the nvidia-pytriton wheel installed, the flags are also checked against the real tritonserver 2.51: each
exists in its --help, and a server started with compose's restricted-API flags refuses a keyless repository
call over REST and gRPC and answers one with the key."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from functools import lru_cache

import pytest
import yaml

from .test_deploy import BASE, COMPOSE, COMPOSE_CPU, CONTRACT, DEPLOY, defaults, find, objects

RESTRICTED = CONTRACT["triton"]["restricted"]
FLAGS = ("--http-restricted-api", "--grpc-restricted-protocol")
KEY_ENV, KEY_SECRET = RESTRICTED["key_env"], RESTRICTED["key_secret"]
ADMIN = CONTRACT["gateway"]["env"]["admin_token"]
GW_PORT, PORTS = CONTRACT["gateway"]["port"], CONTRACT["triton"]["ports"]
TRITON_IMAGE = COMPOSE["services"]["triton"]["image"].split(":")[0]


@lru_cache(maxsize=None)
def rendered(folder: str) -> tuple:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (its built-in kustomize) is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def dockerfile_cmd(name: str = "triton.Dockerfile") -> list[str]:
    text = re.sub(r"\\\n", "", (DEPLOY / "docker" / name).read_text())
    cmd = json.loads(next(ln for ln in text.splitlines() if ln.startswith("CMD "))[4:])
    return shlex.split(cmd[2]) if cmd[:2] == ["/bin/sh", "-c"] else cmd


def pod_containers(objs) -> list[tuple[str, dict, dict]]:
    """(where, container, pod spec) for every container of every Deployment, and KServe's Triton predictor."""
    out = []
    for o in objs:
        if o["kind"] == "Deployment":
            spec = o["spec"]["template"]["spec"]
            out += [(f"{o['metadata']['name']}/{c['name']}", c, spec) for c in spec["containers"]]
        if o["kind"] == "InferenceService":
            out.append((f"isvc/{o['metadata']['name']}", o["spec"]["predictor"]["triton"], o["spec"]["predictor"]))
    return out


def is_triton(c: dict) -> bool:
    return c.get("image", "").startswith(TRITON_IMAGE) or "storageUri" in c


def manifests() -> dict[str, list]:
    return {"k8s/base": BASE, "k8s/colocated": list(rendered("k8s/colocated")), "kserve": objects("kserve")}


def command_lines(compose=COMPOSE, mf=None) -> list[tuple[str, str, list[str], list]]:
    """(where, style, args, k8s env) of every place deploy/ starts tritonserver."""
    lines = [(f"compose/{n}", "shell", s["command"], []) for n, s in compose["services"].items()
             if "tritonserver" in s.get("command", [])]
    lines += [(f"{name} CMD", "shell", dockerfile_cmd(name), [])
              for name in ("triton.Dockerfile", "triton-cpu.Dockerfile")]
    for folder, objs in (mf or manifests()).items():
        lines += [(f"{folder}:{w}", "k8s", c.get("args", []), c.get("env", [])) for w, c, _ in pod_containers(objs)
                  if is_triton(c)]
    return lines


# ----------------------------------------------------------------------------- (a) restricted APIs, keyed
def key_problems(where: str, style: str, key: str, env: list) -> list[str]:
    if style == "shell":  # compose interpolation / sh: ${VAR:?} refuses to start when the variable is unset
        ok = re.fullmatch(rf"\$\{{{KEY_ENV}:\?[^}}]*\}}", key)
        return [] if ok else [f"{where}: key {key!r} is not ${{{KEY_ENV}:?}}"]
    if key != f"$({KEY_ENV})":
        return [f"{where}: key {key!r} is not $({KEY_ENV})"]
    ref = next((e for e in env if e["name"] == KEY_ENV), None)  # undefined, $(VAR) stays a literal: a known key
    sec = ((ref or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
    if sec.get("name") != KEY_SECRET or sec.get("key") != KEY_ENV:
        return [f"{where}: {KEY_ENV} does not come from Secret {KEY_SECRET}"]
    return []


def restricted_problems(lines) -> list[str]:
    problems = []
    for where, style, args, env in lines:
        for flag in FLAGS:
            values = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
            if len(values) != 1:
                problems.append(f"{where}: {len(values)} {flag} flags")
                continue
            m = re.fullmatch(r"([a-z,-]+):([a-z0-9-]+)=(.*)", values[0])
            if not m or m.group(1).split(",") != RESTRICTED["apis"] or m.group(2) != RESTRICTED["header"]:
                problems.append(f"{where}: {flag}={values[0]} is not {','.join(RESTRICTED['apis'])}:"
                                f"{RESTRICTED['header']}=KEY")
                continue
            problems += key_problems(where, style, m.group(3), env)
    return problems


def test_every_tritonserver_restricts_its_apis_to_a_secret_key():
    lines = command_lines()
    assert [w for w, *_ in lines] == ["compose/triton", "triton.Dockerfile CMD", "triton-cpu.Dockerfile CMD",
                                      "k8s/base:hpeft-triton/tritonserver", "k8s/colocated:hpeft-triton/tritonserver",
                                      "kserve:isvc/hpeft"]
    assert restricted_problems(lines) == []
    assert COMPOSE_CPU["services"]["triton"]["command"] == COMPOSE["services"]["triton"]["command"]
    assert dockerfile_cmd("triton-cpu.Dockerfile") == dockerfile_cmd()


def with_compose_arg(old: str, new: str | None) -> dict:
    c = copy.deepcopy(COMPOSE)
    args = c["services"]["triton"]["command"]
    i = next(i for i, a in enumerate(args) if a.startswith(old))
    args[i:i + 1] = [] if new is None else [new]
    return c


def with_k8s_env(env: list) -> dict:
    mf = manifests()
    mf["kserve"] = copy.deepcopy(mf["kserve"])
    find(mf["kserve"], "InferenceService", "hpeft")["spec"]["predictor"]["triton"]["env"] = env
    return mf


APIS = ",".join(RESTRICTED["apis"])


@pytest.mark.parametrize("mutation", ["no grpc flag", "literal key", "default key", "fewer apis", "other header",
                                      "key as value", "key undefined", "key from another secret"])
def test_an_unrestricted_or_literal_keyed_tritonserver_is_caught(mutation):
    compose, mf = COMPOSE, None
    key = KEY_ENV
    if mutation == "no grpc flag":
        compose = with_compose_arg(FLAGS[1], None)
    elif mutation in ("literal key", "default key", "fewer apis", "other header"):
        value = {"literal key": f"{APIS}:{RESTRICTED['header']}=s3cret",
                 "default key": f"{APIS}:{RESTRICTED['header']}=${{{key}:-s3cret}}",
                 "fewer apis": f"shared-memory,trace,logging:{RESTRICTED['header']}=${{{key}:?}}",
                 "other header": f"{APIS}:x-key=${{{key}:?}}"}[mutation]
        compose = with_compose_arg(FLAGS[0], f"{FLAGS[0]}={value}")
    else:
        env = {"key as value": [{"name": KEY_ENV, "value": "s3cret"}], "key undefined": [],
               "key from another secret": [{"name": KEY_ENV, "valueFrom": {"secretKeyRef": {"name": "hpeft-admin",
                                                                                            "key": KEY_ENV}}}]}
        mf = with_k8s_env(env[mutation])
    problems = restricted_problems(command_lines(compose, mf))
    assert len(problems) == (1 if mf is None else 2), problems  # compose: one flag changed; KServe: both keys


# ----------------------------------------------------------------------------- (b) what is reachable
def compose_publish_problems(compose: dict) -> list[str]:
    problems = []
    for name, svc in compose["services"].items():
        published = [defaults(str(p)) for p in svc.get("ports", [])]  # the host side may be a ${VAR:-default}
        want = [f"{GW_PORT}:{GW_PORT}"] if name == "gateway" else []
        if published != want or any(not str(p).endswith(f":{GW_PORT}") for p in svc.get("ports", [])):
            problems.append(f"compose/{name} publishes {published}, not {want}")
        if svc.get("network_mode") == "host":
            problems.append(f"compose/{name} runs in the host's network")
    return problems


def k8s_reach_problems(objs, colocated: bool) -> list[str]:
    problems = []
    for o in objs:
        if o["kind"] == "Service" and (o["spec"].get("type", "ClusterIP") != "ClusterIP" or "externalIPs" in o["spec"]):
            problems.append(f"Service/{o['metadata']['name']} is reachable from outside the cluster")
    for where, c, pod in pod_containers(objs):
        if pod.get("hostNetwork") or any("hostPort" in p for p in c.get("ports", [])):
            problems.append(f"{where} takes the node's ports")
        if colocated and is_triton(c):
            args = c.get("args", [])
            for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1"):
                if flag not in args:
                    problems.append(f"{where}: {flag} missing beside the gateway")
            if "--metrics-address=0.0.0.0" not in args:  # it follows --http-address by default
                problems.append(f"{where}: metrics bound to loopback with HTTP")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if "exec" not in c.get(probe, {}):
                    problems.append(f"{where}: {probe} cannot reach a loopback-only Triton")
    return problems


def policy_problems(objs, colocated: bool) -> list[str]:
    pols = [o for o in objs if o["kind"] == "NetworkPolicy"
            and o["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": "hpeft-triton"}]
    if len(pols) != 1 or pols[0]["spec"].get("policyTypes") != ["Ingress"]:
        return ["no Ingress NetworkPolicy for the Triton pods"]
    gateway = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "hpeft-gateway"}}}]
    open_ports = {"gateway", "metrics"} if colocated else {"metrics"}
    problems = []
    for rule in pols[0]["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [{"port": "ANY"}])}
        allowed = open_ports if "from" not in rule else open_ports | ({"grpc"} if rule["from"] == gateway else set())
        if ports - allowed:
            problems.append(f"NetworkPolicy lets {rule.get('from', 'anyone')} reach {sorted(ports - allowed)}")
    return problems


def test_only_the_gateway_is_published():
    assert compose_publish_problems(COMPOSE) == [] and compose_publish_problems(COMPOSE_CPU) == []
    assert k8s_reach_problems(BASE, False) == [] and policy_problems(BASE, False) == []
    colocated = rendered("k8s/colocated")
    assert k8s_reach_problems(colocated, True) == [] and policy_problems(colocated, True) == []
    svc = find(colocated, "Service", "hpeft-triton")  # the Ingress's backend there: only gateway and metrics
    assert {p["name"] for p in svc["spec"]["ports"]} == {"gateway", "metrics"}
    labels = find(objects("kserve"), "InferenceService", "hpeft")["metadata"]["labels"]
    assert labels["networking.knative.dev/visibility"] == labels["networking.kserve.io/visibility"] == "cluster-local"


def test_published_or_open_triton_is_caught():
    for ports in (["8000:8000"], ["127.0.0.1:8001:8001"]):
        c = copy.deepcopy(COMPOSE)
        c["services"]["triton"]["ports"] = ports
        assert len(compose_publish_problems(c)) == 1
    c = copy.deepcopy(COMPOSE)
    c["services"]["triton"]["network_mode"] = "host"
    c["services"]["gateway"]["ports"].append("8001:8001")
    assert len(compose_publish_problems(c)) == 2
    c = copy.deepcopy(COMPOSE)
    c["services"]["gateway"]["ports"] = ["${HPEFT_GATEWAY_PUBLISH:-8080}:${HPEFT_GATEWAY_PORT:-8080}"]
    assert len(compose_publish_problems(c)) == 1  # the container side stays the contract's port
    base = copy.deepcopy(BASE)
    find(base, "Service", "hpeft-triton")["spec"]["type"] = "LoadBalancer"
    next(c for _, c, _ in pod_containers(base) if is_triton(c))["ports"][0]["hostPort"] = 8000
    assert len(k8s_reach_problems(base, False)) == 2
    find(base, "NetworkPolicy", "hpeft-triton")["spec"]["ingress"][0].pop("from")
    assert policy_problems(base, False) == ["NetworkPolicy lets anyone reach ['grpc']"]
    colocated = copy.deepcopy(list(rendered("k8s/colocated")))
    t = next(c for _, c, _ in pod_containers(colocated) if is_triton(c))
    t["args"].remove("--grpc-address=127.0.0.1")
    t["readinessProbe"] = {"httpGet": {"path": "/v2/health/ready", "port": 8000}}
    assert len(k8s_reach_problems(colocated, True)) == 2


# ----------------------------------------------------------------------------- (c) the admin token stays out
def admin_problems(compose: dict, mf: dict) -> list[str]:
    problems = []
    for name, svc in compose["services"].items():
        env = svc.get("environment", {})
        text = json.dumps(env) + json.dumps(svc.get("env_file", ""))
        if "tritonserver" in svc.get("command", []) and (ADMIN in text or svc.get("env_file")):
            problems.append(f"compose/{name}: the admin token may reach Triton")
    admin_secret = "hpeft-admin"
    for folder, objs in mf.items():
        for where, c, pod in pod_containers(objs):
            if not is_triton(c):
                continue
            if pod.get("shareProcessNamespace"):
                problems.append(f"{folder}:{where}: shares its process namespace (the gateway's environment)")
            refs = [json.dumps(e) for e in c.get("env", []) + c.get("envFrom", [])]
            if any(ADMIN in r or f'"{admin_secret}"' in r for r in refs):
                problems.append(f"{folder}:{where}: the admin token is in its environment")
    return problems


def test_the_admin_token_is_in_no_triton_environment():
    mf = manifests()
    assert admin_problems(COMPOSE, mf) == [] and admin_problems(COMPOSE_CPU, {}) == []
    gateways = [c for objs in mf.values() for _, c, _ in pod_containers(objs) if not is_triton(c)]
    assert len(gateways) == 2 and all(ADMIN in {e["name"] for e in c["env"]} for c in gateways)
    assert ADMIN in COMPOSE["services"]["gateway"]["environment"]


@pytest.mark.parametrize("mutation", ["compose env", "compose env_file", "k8s env", "k8s other name",
                                      "k8s envFrom", "shared pids"])
def test_an_admin_token_beside_triton_is_caught(mutation):
    compose, mf = copy.deepcopy(COMPOSE), manifests()
    mf = {k: copy.deepcopy(v) for k, v in mf.items()}
    triton = next(c for _, c, _ in pod_containers(mf["k8s/base"]) if is_triton(c))
    ref = {"valueFrom": {"secretKeyRef": {"name": "hpeft-admin", "key": ADMIN}}}
    if mutation == "compose env":
        compose["services"]["triton"]["environment"] = {"TOKEN": f"${{{ADMIN}}}"}
    elif mutation == "compose env_file":
        compose["services"]["triton"]["env_file"] = ["hpeft.env"]
    elif mutation in ("k8s env", "k8s other name"):
        triton["env"].append({"name": ADMIN if mutation == "k8s env" else "TOKEN", **ref})
    elif mutation == "k8s envFrom":
        triton["envFrom"] = [{"secretRef": {"name": "hpeft-admin"}}]
    else:
        find(mf["k8s/colocated"], "Deployment", "hpeft-triton")["spec"]["template"]["spec"][
            "shareProcessNamespace"] = True
    assert len(admin_problems(compose, mf)) == 1


# ----------------------------------------------------------------------------- (d) resource limits
def limits_problems(compose: dict, mf: dict) -> list[str]:
    problems = [f"compose/{n}: no cpus/memory limits" for n, s in compose["services"].items()
                if not {"cpus", "memory"} <= set(s.get("deploy", {}).get("resources", {}).get("limits", {}))]
    for folder, objs in mf.items():
        for where, c, _ in pod_containers(objs):
            res = c.get("resources", {})
            want = {"cpu", "memory"} | ({"nvidia.com/gpu"} if is_triton(c) else set())
            if not want <= set(res.get("limits", {})) or not {"cpu", "memory"} <= set(res.get("requests", {})):
                problems.append(f"{folder}:{where}: limits {res.get('limits')}, requests {res.get('requests')}")
            elif any(quantity(res["requests"][k]) > quantity(res["limits"][k]) for k in ("cpu", "memory")):
                problems.append(f"{folder}:{where}: requests over limits")
    return problems


def quantity(q) -> float:
    m = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|Ti)?", str(q))
    return float(m.group(1)) * {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]


def test_every_container_has_limits():
    mf = manifests()
    assert sum(len(pod_containers(o)) for o in mf.values()) == 5  # base 2, colocated 2, KServe 1
    assert limits_problems(COMPOSE, mf) == [] and limits_problems(COMPOSE_CPU, {}) == []


@pytest.mark.parametrize("mutation", ["compose", "cpu", "over"])
def test_a_container_without_limits_is_caught(mutation):
    compose, mf = copy.deepcopy(COMPOSE), {k: copy.deepcopy(v) for k, v in manifests().items()}
    gw = next(c for _, c, _ in pod_containers(mf["k8s/colocated"]) if not is_triton(c))
    if mutation == "compose":
        del compose["services"]["gateway"]["deploy"]
    elif mutation == "cpu":
        del gw["resources"]["limits"]["cpu"]
    else:
        gw["resources"]["requests"]["memory"] = "3Gi"
    assert len(limits_problems(compose, mf)) == 1


# ----------------------------------------------------------------------------- (e) Python and deploy/ agree
def agreement_problems(python_args: list[str], deploy_args: list[str]) -> list[str]:
    def form(args):  # APIS:HEADER of each restricted flag, the key left out
        return {f: a.split("=", 1)[1].rsplit("=", 1)[0] for a in args for f in FLAGS if a.startswith(f + "=")}
    p, d = form(python_args), form(deploy_args)
    return [] if p == d and len(p) == 2 else [f"`hpeft serve` restricts {p}, deploy/ {d}"]


def hpeft_serve_args(tmp_path) -> list[str]:
    triton = pytest.importorskip("hpeft_serve.serving.triton")
    try:
        inst = triton.locate()
    except Exception as e:  # noqa: BLE001 - no nvidia-pytriton wheel: nothing to compare with
        pytest.skip(str(e))
    return triton.TritonServer(tmp_path / "repo", work=tmp_path).command(inst)


def test_python_and_deploy_agree_on_the_restricted_apis(tmp_path):
    from hpeft_serve.gateway import ENV
    from hpeft_serve.serving.client import TRITON_KEY_ENV, TRITON_KEY_HEADER
    assert RESTRICTED["header"] == TRITON_KEY_HEADER and KEY_ENV == TRITON_KEY_ENV
    assert ENV["triton_key"] == CONTRACT["gateway"]["env"]["triton_key"] == KEY_ENV
    args = hpeft_serve_args(tmp_path)
    assert agreement_problems(args, COMPOSE["services"]["triton"]["command"]) == []
    other = [a.replace("trace,logging:", "trace:") for a in COMPOSE["services"]["triton"]["command"]]
    assert len(agreement_problems(args, other)) == 1


# ----------------------------------------------------------------------------- the real tritonserver 2.51
@pytest.fixture(scope="module")
def tritonserver():
    triton = pytest.importorskip("hpeft_serve.serving.triton")
    try:
        inst = triton.locate()
    except Exception as e:  # noqa: BLE001
        pytest.skip(str(e))
    return triton, inst, triton.environment(inst)


def test_every_flag_deploy_gives_tritonserver_exists(tritonserver):
    _, inst, env = tritonserver
    helptext = subprocess.run([str(inst.binary), "--help"], capture_output=True, text=True, env=env, timeout=60)
    known = set(re.findall(r"^\s+(--[a-z0-9-]+)", helptext.stdout + helptext.stderr, re.M))
    assert set(FLAGS) | {"--http-address", "--metrics-address"} <= known

    def unknown(lines):
        return {a.split("=", 1)[0] for _, _, args, _ in lines for a in args if a.startswith("--")} - known
    assert unknown(command_lines()) == set()
    assert unknown([("typo", "k8s", ["--http-restricted-apis=x"], [])]) == {"--http-restricted-apis"}


def interpolate(arg: str, env: dict[str, str]) -> str:
    """compose's and sh's ${VAR:?} / ${VAR:-default}, for the variables this file uses."""
    def one(m):
        if env.get(m.group(1)):
            return env[m.group(1)]
        if m.group(2) == ":?":
            raise KeyError(f"{m.group(1)} is required")
        return m.group(3)
    return re.sub(r"\$\{(\w+)(:[?-])([^}]*)\}", one, arg)


def call(url: str, headers: dict) -> int:
    req = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_compose_flags_refuse_a_keyless_repository_call(tritonserver, tmp_path):
    """tritonserver started with compose's restricted-API flags (the key interpolated as compose would) on an
    empty repository: the repository index, over REST and gRPC, only with the key; health stays open."""
    import tritonclient.grpc as grpcclient
    from hpeft_serve.serving.client import TRITON_KEY_HEADER, free_ports
    triton, inst, env = tritonserver
    key = "k" + str(time.time_ns())
    with pytest.raises(KeyError):
        interpolate(COMPOSE["services"]["triton"]["command"][-1], {})
    restricted = [interpolate(a, {KEY_ENV: key}) for a in COMPOSE["services"]["triton"]["command"]
                  if a.startswith(FLAGS)]
    (tmp_path / "repo").mkdir()
    http, grpc, metrics = free_ports(3)
    cmd = [str(inst.binary), f"--model-repository={tmp_path / 'repo'}", "--model-control-mode=explicit",
           f"--backend-directory={triton.backend_dir(inst, tmp_path)}", f"--http-port={http}",
           f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--http-address=127.0.0.1",
           "--grpc-address=127.0.0.1", "--allow-gpu-metrics=false", "--exit-timeout-secs=1", *restricted]
    log = (tmp_path / "tritonserver.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{http}"
        for _ in range(600):
            assert proc.poll() is None, (tmp_path / "tritonserver.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"{base}/v2/health/live", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        assert call(f"{base}/v2/repository/index", {}) == 403
        assert call(f"{base}/v2/repository/index", {TRITON_KEY_HEADER: "wrong"}) == 403
        assert call(f"{base}/v2/repository/index", {TRITON_KEY_HEADER: key}) == 200
        assert call(f"{base}/v2/logging", {}) == 403
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        assert client.is_server_live()  # health is not restricted: probes need no key
        with pytest.raises(Exception, match="restricted"):
            client.get_model_repository_index()
        # over gRPC Triton reads the key from metadata triton-grpc-protocol-<header>
        assert client.get_model_repository_index(headers={f"triton-grpc-protocol-{TRITON_KEY_HEADER}": key}) is not None
        client.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()
