"""deploy/ checked offline: every YAML parses and passes yamllint (deploy/.yamllint); every core Kubernetes
object validates in strict mode against the schemas kubernetes-validate ships (Kubernetes 1.32); the KServe
InferenceService against deploy/kserve/inferenceservice.schema.json (a subset of the CRD, written here); the
compose file, the manifests, the KServe variant and the Dockerfiles agree with deploy/contract.yaml (ports,
probe paths, the gateway's environment variables, images, Triton's flags); the Dockerfiles copy files that
exist; the Triton image's requirements cover what the serving path imports, without torch. Nothing here needs
a cluster, a GPU, a Docker daemon or the network; `kubectl kustomize` renders the overlays when kubectl is
installed (skipped otherwise). The security rules (restricted APIs, what is published, where the secrets go,
limits) are in test_deploy_security.py."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.32.0"
CORE_GROUPS = {"v1", "apps/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1"}
CONTRACT = yaml.safe_load((DEPLOY / "contract.yaml").read_text())
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") or p.name == ".yamllint")


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags: `!reset` (drop the key from the files before) and `!override`."""


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node, deep=True)
                              if isinstance(node, yaml.MappingNode) else loader.construct_sequence(node, deep=True))


class Reset:
    pass


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=ComposeLoader) if d is not None]


def merge(base: dict, over: dict) -> dict:
    """`compose -f base -f over`: mappings merged key by key, anything else replaced, `!reset` drops the key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Reset):
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def defaults(value: str) -> str:
    """compose's ${VAR:-default} with every variable unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def objects(*folders: str) -> list[dict]:
    return [d for f in folders for p in sorted((DEPLOY / f).glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in docs(p)]


def find(objs: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


BASE = objects("k8s/base")
COMPOSE = docs(DEPLOY / "compose.yaml")[0]
COMPOSE_CPU = merge(COMPOSE, docs(DEPLOY / "compose.cpu.yaml")[0])  # compose.yaml + compose.cpu.yaml, as run


# ----------------------------------------------------------------------------- YAML
def test_every_yaml_parses():
    assert len(YAML_FILES) >= 12
    for p in YAML_FILES:
        assert docs(p), f"{p} is empty"


def lint(text: str, path: str = "x.yaml") -> list:
    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    return list(linter.run(text, conf, path))


def test_yamllint_passes():
    problems = {str(p.relative_to(DEPLOY)): [f"{x.line}:{x.column} {x.message}" for x in lint(p.read_text(), str(p))]
                for p in YAML_FILES}
    assert not {k: v for k, v in problems.items() if v}


def test_yamllint_catches_a_broken_file():
    broken = "a: 1\na: 2\nb:   [1,2]\nc: " + "x" * 130 + "\n"
    rules = {x.rule for x in lint(broken)}
    assert {"key-duplicates", "line-length"} <= rules


# ----------------------------------------------------------------------------- Kubernetes objects
def core(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["apiVersion"] in CORE_GROUPS]


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_core_objects_validate_strict():
    objs = core(objects("k8s/base", "k8s/monitoring", "kserve"))
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "Ingress", "ServiceAccount", "NetworkPolicy"} <= kinds
    for o in objs:
        validate(o)


@pytest.mark.parametrize("breakage", ["typo", "type", "missing"])
def test_a_broken_manifest_is_caught(breakage):
    dep = copy.deepcopy(find(BASE, "Deployment", "hpeft-triton"))
    c = dep["spec"]["template"]["spec"]["containers"][0]
    if breakage == "typo":
        c["readinessProbes"] = c.pop("readinessProbe")
    elif breakage == "type":
        c["ports"][0]["containerPort"] = "8000x"
    else:
        del dep["spec"]["selector"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)


def kustomization(folder: str) -> dict:
    return yaml.safe_load((DEPLOY / folder / "kustomization.yaml").read_text())


@pytest.mark.parametrize("folder", ["k8s/base", "k8s/monitoring", "k8s/colocated", "kserve"])
def test_kustomizations_name_existing_files_and_miss_none(folder):
    k = kustomization(folder)
    listed = [r for r in k.get("resources", [])] + [p["path"] for p in k.get("patches", []) if "path" in p]
    for r in listed:
        assert (DEPLOY / folder / r).exists(), f"{folder}/kustomization.yaml names {r}, which does not exist"
    own = {p.name for p in (DEPLOY / folder).glob("*.yaml")} - {"kustomization.yaml"}
    missing = {f for f in own if f not in listed and not f.endswith(".example.yaml")}
    assert not missing, f"{folder}: not in kustomization.yaml: {missing}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
@pytest.mark.parametrize("folder", ["k8s/base", "k8s/monitoring", "k8s/colocated", "kserve"])
def test_kustomize_renders_valid_objects(folder):
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert rendered and all(o["metadata"].get("namespace") == "hpeft" for o in rendered)
    for o in core(rendered):
        validate(o)
    if folder == "k8s/colocated":
        names = {(o["kind"], o["metadata"]["name"]) for o in rendered}
        assert ("Deployment", "hpeft-gateway") not in names
        triton = find(rendered, "Deployment", "hpeft-triton")
        gw = container(triton, "gateway")
        assert {e["name"]: e.get("value") for e in gw["env"]}[CONTRACT["gateway"]["env"]["triton"]] == (
            f"localhost:{CONTRACT['triton']['ports']['grpc']}")
        ingress = find(rendered, "Ingress", "hpeft-gateway")
        assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "hpeft-triton"


# ----------------------------------------------------------------------------- KServe
SCHEMA = json.loads((DEPLOY / "kserve" / "inferenceservice.schema.json").read_text())


def isvc() -> dict:
    return find(objects("kserve"), "InferenceService", "hpeft")


def test_inferenceservice_matches_its_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(isvc(), SCHEMA, cls=jsonschema.Draft202012Validator)
    triton = isvc()["spec"]["predictor"]["triton"]
    assert CONTRACT["triton"]["image"].endswith(":" + triton["runtimeVersion"])
    assert triton["storageUri"] == find(BASE, "ConfigMap", "hpeft-config")["data"]["HPEFT_REPO"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("path,value", [(("spec", "predictor", "triton", "storageURI"), "s3://b/m"),
                                        (("spec", "predictor", "triton", "storageUri"), "/local/path"),
                                        (("kind",), "InferenceServices")])
def test_a_broken_inferenceservice_is_caught(path, value):
    obj = isvc()
    node = obj
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, SCHEMA, cls=jsonschema.Draft202012Validator)


# ----------------------------------------------------------------------------- agreement with the contract
PORTS = CONTRACT["triton"]["ports"]
GW_PORT = CONTRACT["gateway"]["port"]
GW_ENV = set(CONTRACT["gateway"]["env"].values())


def flags(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


def test_triton_ports_agree():
    triton = find(BASE, "Deployment", "hpeft-triton")
    c = container(triton, "tritonserver")
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == PORTS
    svc = find(BASE, "Service", "hpeft-triton")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == PORTS  # ClusterIP: tests/test_deploy_security.py
    for args in (c["args"], COMPOSE["services"]["triton"]["command"]):
        f = flags(args)
        assert {k: int(f[f"{k}-port"]) for k in PORTS} == PORTS


def test_triton_flags_are_the_same_in_compose_and_kubernetes():
    k8s = container(find(BASE, "Deployment", "hpeft-triton"), "tritonserver")["args"]
    compose = COMPOSE["services"]["triton"]["command"]
    def strip(a):  # the key is a Kubernetes $(VAR) in one, a compose ${VAR:?} in the other
        return [re.sub(r"=\$[({]HPEFT_TRITON_KEY(:\?)?[)}]$", "=KEY", x) for x in a
                if not x.startswith("--model-repository=")]
    assert strip(k8s) == strip(compose)
    assert "--model-repository=$(TRITON_MODEL_REPOSITORY)" in k8s
    assert "--model-repository=/models" in compose


def test_gateway_port_and_env_agree():
    gw = container(find(BASE, "Deployment", "hpeft-gateway"), "gateway")
    assert [p["containerPort"] for p in gw["ports"]] == [GW_PORT]
    assert find(BASE, "Service", "hpeft-gateway")["spec"]["ports"][0]["port"] == GW_PORT
    compose = COMPOSE["services"]["gateway"]
    assert [defaults(p) for p in compose["ports"]] == [f"{GW_PORT}:{GW_PORT}"]
    assert compose["ports"][0].endswith(f":{GW_PORT}")  # the host side a variable, the container side fixed
    assert set(compose["environment"]) == GW_ENV
    k8s_env = {e["name"] for e in gw["env"]}
    assert GW_ENV <= k8s_env
    assert {n for n in k8s_env if n.startswith("HPEFT_")} == GW_ENV
    colocated = yaml.safe_load((DEPLOY / "k8s" / "colocated" / "triton-with-gateway.yaml").read_text())
    assert {e["name"] for e in container(colocated, "gateway")["env"]} == k8s_env
    for args in (gw["args"], compose["command"]):
        assert args[args.index("--port") + 1] == str(GW_PORT)
    assert compose["environment"][CONTRACT["gateway"]["env"]["triton"]] == f"triton:{PORTS['grpc']}"
    cm = find(BASE, "ConfigMap", "hpeft-config")["data"]
    assert cm[CONTRACT["gateway"]["env"]["triton"]] == f"hpeft-triton:{PORTS['grpc']}"


def test_probes_use_the_contract_paths():
    t = container(find(BASE, "Deployment", "hpeft-triton"), "tritonserver")
    assert t["readinessProbe"]["httpGet"]["path"] == CONTRACT["triton"]["probes"]["readiness"]
    assert t["livenessProbe"]["httpGet"]["path"] == CONTRACT["triton"]["probes"]["liveness"]
    g = container(find(BASE, "Deployment", "hpeft-gateway"), "gateway")
    assert g["readinessProbe"]["httpGet"]["path"] == CONTRACT["gateway"]["probes"]["readiness"]
    assert g["livenessProbe"]["httpGet"]["path"] == CONTRACT["gateway"]["probes"]["liveness"]
    tc = " ".join(COMPOSE["services"]["triton"]["healthcheck"]["test"])
    gc = " ".join(COMPOSE["services"]["gateway"]["healthcheck"]["test"])
    assert f":{PORTS['http']}{CONTRACT['triton']['probes']['readiness']}" in tc
    assert f":{GW_PORT}{CONTRACT['gateway']['probes']['readiness']}" in gc
    assert COMPOSE["services"]["gateway"]["depends_on"]["triton"]["condition"] == "service_healthy"


def test_compose_reserves_a_gpu_and_shares_the_repository():
    triton, gateway = COMPOSE["services"]["triton"], COMPOSE["services"]["gateway"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert [defaults(v) for v in triton["volumes"]] == ["../model_repository:/models:ro"]
    assert [defaults(v) for v in gateway["volumes"]] == ["../model_repository:/models"]
    assert triton["volumes"][0].split(":", 1)[0] == gateway["volumes"][0].split(":", 1)[0]  # one folder
    env = gateway["environment"]
    assert env["HPEFT_REPO"] == "/models"
    assert env["HPEFT_ADAPTER_STORE"] == f"/models/{CONTRACT['triton']['model']}/1/export/packs"
    assert (ROOT / "model_repository" / CONTRACT["triton"]["model"] / "config.pbtxt").is_file()


def test_repository_and_store_name_one_place():
    cm = find(BASE, "ConfigMap", "hpeft-config")["data"]
    repo = cm["HPEFT_REPO"]
    assert cm["HPEFT_ADAPTER_STORE"] == f"{repo}/{CONTRACT['triton']['model']}/1/export/packs"
    # Triton's spelling s3://[http://]HOST:PORT/BUCKET/PATH names the bucket/path of fsspec's s3://BUCKET/PATH
    m = re.fullmatch(r"s3://(https?://)?([^/]+):(\d+)/(.+)", cm["TRITON_MODEL_REPOSITORY"])
    assert m and f"s3://{m.group(4)}" == repo
    assert cm["FSSPEC_S3_ENDPOINT_URL"] == f"{m.group(1) or 'https://'}{m.group(2)}:{m.group(3)}"


def test_config_pbtxt_parameters_match_the_contract():
    for f in (ROOT / "hpeft_serve" / "serving" / "config.pbtxt", ROOT / "model_repository" / "hpeft" / "config.pbtxt"):
        params = re.findall(r'parameters\s*{\s*key:\s*"(\w+)"', f.read_text())
        assert params == CONTRACT["triton"]["parameters"], f


def test_images_agree():
    assert COMPOSE["services"]["triton"]["image"] == container(find(BASE, "Deployment", "hpeft-triton"),
                                                               "tritonserver")["image"]
    assert COMPOSE["services"]["gateway"]["image"] == container(find(BASE, "Deployment", "hpeft-gateway"),
                                                                "gateway")["image"]
    assert isvc()["spec"]["predictor"]["triton"]["image"] == COMPOSE["services"]["triton"]["image"]
    tags = {i["name"]: i["newTag"] for i in kustomization("k8s/base")["images"]}
    for svc in ("triton", "gateway"):
        name, tag = COMPOSE["services"][svc]["image"].split(":")
        assert tags[name] == tag
    assert f"ARG TRITON_IMAGE={CONTRACT['triton']['image']}" in (DEPLOY / "docker" / "triton.Dockerfile").read_text()
    # the CPU variant: the same repository and tag, its own name; every other service setting from compose.yaml
    assert COMPOSE_CPU["services"]["triton"]["image"] == COMPOSE["services"]["triton"]["image"].replace(
        "/triton:", "/triton-cpu:")
    assert COMPOSE_CPU["services"]["gateway"] == COMPOSE["services"]["gateway"]


def test_compose_cpu_drops_only_the_gpu():
    cpu, gpu = COMPOSE_CPU["services"]["triton"], COMPOSE["services"]["triton"]
    assert "reservations" not in cpu["deploy"]["resources"]
    assert cpu["deploy"]["resources"]["limits"] == gpu["deploy"]["resources"]["limits"]
    for k in ("command", "volumes", "healthcheck", "shm_size", "restart"):
        assert cpu[k] == gpu[k], k
    assert cpu["read_only"] is True and cpu["tmpfs"] == ["/tmp"]
    assert cpu["build"]["dockerfile"] == "deploy/docker/triton-cpu.Dockerfile"
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": Reset()}}) == {"a": {"c": 2}}  # the merge drops a key


def test_ingress_routes_by_the_affinity_header_and_takes_uploads():
    ing = find(BASE, "Ingress", "hpeft-gateway")
    ann = ing["metadata"]["annotations"]
    header = CONTRACT["affinity_header"].lower().replace("-", "_")
    assert ann["nginx.ingress.kubernetes.io/upstream-hash-by"] == f"$http_{header}"
    body_mb = int(ann["nginx.ingress.kubernetes.io/proxy-body-size"].rstrip("m"))
    assert body_mb >= int(find(BASE, "ConfigMap", "hpeft-config")["data"]["HPEFT_MAX_UPLOAD_MB"])


def test_selectors_targets_and_autoscalers_match():
    deps = {o["metadata"]["name"]: o for o in BASE if o["kind"] == "Deployment"}
    for d in deps.values():
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    for o in BASE:
        if o["kind"] in ("Service", "PodDisruptionBudget"):
            sel = o["spec"]["selector"] if o["kind"] == "Service" else o["spec"]["selector"]["matchLabels"]
            matching = [d for d in deps.values() if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert len(matching) == 1, o["metadata"]["name"]
            if o["kind"] == "Service":
                names = {p["name"] for c in matching[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
                assert {p["targetPort"] for p in o["spec"]["ports"]} <= names
        if o["kind"] == "HorizontalPodAutoscaler":
            assert o["spec"]["scaleTargetRef"]["name"] in deps
    rules = yaml.safe_load(find(objects("k8s/monitoring"), "ConfigMap", "hpeft-prometheus-adapter-rules")
                           ["data"]["config.yaml"])
    served = {r["name"]["as"] for r in rules["rules"]}
    hpa = find(BASE, "HorizontalPodAutoscaler", "hpeft-triton")
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"} <= served
    monitor = find(objects("k8s/monitoring"), "ServiceMonitor", "hpeft-triton")
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in find(BASE, "Service", "hpeft-triton")
                                                       ["spec"]["ports"]}


# ----------------------------------------------------------------------------- Dockerfiles
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in (x.strip() for x in text.splitlines()) if ln and not ln.startswith("#")]


def copy_sources(path: Path) -> list[str]:
    return [s for op, arg in instructions(path) if op == "COPY" and "--from" not in arg for s in arg.split()[:-1]]


def test_dockerfiles_copy_files_that_exist_and_are_not_ignored():
    assert {p.name for p in DOCKERFILES} == {"triton.Dockerfile", "triton-cpu.Dockerfile", "gateway.Dockerfile"}
    for df in DOCKERFILES:
        srcs = copy_sources(df)
        assert srcs, df
        allowed = [ln[1:].rstrip("/") for ln in (df.parent / f"{df.name}.dockerignore").read_text().splitlines()
                   if ln.startswith("!")]
        for s in srcs:
            assert (ROOT / s).exists(), f"{df.name} copies {s}, which does not exist"
            assert any(s == a or s.startswith(a + "/") for a in allowed), f"{df.name}: {s} is in the dockerignore"
    for compose, svc, name in ((COMPOSE, "triton", "triton"), (COMPOSE, "gateway", "gateway"),
                               (COMPOSE_CPU, "triton", "triton-cpu")):
        build = compose["services"][svc]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "docker" / f"{name}.Dockerfile"


def test_a_missing_copy_source_is_caught(tmp_path):
    df = tmp_path / "x.Dockerfile"
    df.write_text("FROM scratch\nCOPY hpeft_serve no_such_folder /src/\n")
    assert [s for s in copy_sources(df) if not (ROOT / s).exists()] == ["no_such_folder"]


def test_dockerfiles_expose_and_run_the_contract():
    for name in ("triton.Dockerfile", "triton-cpu.Dockerfile"):
        triton = dict(instructions(DEPLOY / "docker" / name))
        assert sorted(int(p) for p in triton["EXPOSE"].split()) == sorted(PORTS.values())
        assert CONTRACT["triton"]["probes"]["readiness"] in triton["HEALTHCHECK"]
    cpu = dict(instructions(DEPLOY / "docker" / "triton-cpu.Dockerfile"))
    assert cpu["USER"] == "1000"  # the NGC image's triton-server, as k8s/base/triton.yaml runs it
    assert dict(instructions(DEPLOY / "docker" / "gateway.Dockerfile"))["USER"] == "10001"
    gateway = instructions(DEPLOY / "docker" / "gateway.Dockerfile")
    ops = dict(gateway)
    assert int(ops["EXPOSE"]) == GW_PORT
    assert json.loads(ops["ENTRYPOINT"]) == CONTRACT["gateway"]["command"]
    assert CONTRACT["gateway"]["probes"]["liveness"] in ops["HEALTHCHECK"]


def requirement_names(path: Path) -> set[str]:
    return {re.split(r"[<>=\[ ;]", ln.strip(), maxsplit=1)[0].lower() for ln in path.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")}


def test_gateway_image_installs_the_serve_extra_but_the_triton_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    serve = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    wanted = {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in serve} - {"nvidia-pytriton"}
    assert wanted <= requirement_names(DEPLOY / "docker" / "requirements-gateway.txt")


RUNTIME_IMPORTS = r"""
import sys, types
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "tokenizers", "onnx", "onnxscript"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
before = set(sys.modules)
import hpeft_serve.serving.triton_model, hpeft_serve.serving.runtime, fsspec, onnxruntime, safetensors.numpy
print(" ".join(sorted({m.split(".")[0] for m in set(sys.modules) - before})))
"""


def test_triton_image_needs_no_torch_and_installs_what_the_runtime_imports():
    reqs = requirement_names(DEPLOY / "docker" / "requirements-triton.txt")
    assert not reqs & {"torch", "transformers", "tokenizers", "onnx"}
    out = subprocess.run([sys.executable, "-c", RUNTIME_IMPORTS], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    third_party = set(out.stdout.split()) - set(sys.stdlib_module_names) - {"hpeft_serve", "exporters",
                                                                             "triton_python_backend_utils"}
    from importlib.metadata import packages_distributions
    dists = packages_distributions()  # module -> distributions; built-in helpers such as cython_runtime have none
    gpu_build = {"onnxruntime": "onnxruntime-gpu"}
    needed = {gpu_build.get(d.lower(), d.lower()) for m in third_party for d in dists.get(m, [])}
    # packages that onnxruntime/numpy pull in themselves are theirs to declare
    needed -= {"coloredlogs", "humanfriendly", "flatbuffers", "packaging", "protobuf", "google", "sympy", "mpmath"}
    assert {"numpy", "safetensors", "onnxruntime-gpu", "fsspec"} <= needed
    assert needed <= reqs, f"imported by the serving path but not in requirements-triton.txt: {needed - reqs}"


def test_the_gateway_reads_the_contract_env_names_once_it_exists():
    sources = {p: p.read_text() for p in (ROOT / "hpeft_serve").rglob("*.py")}
    if not any(CONTRACT["gateway"]["env"]["triton"] in s for s in sources.values()):
        pytest.skip("no gateway in hpeft_serve yet (it reads HPEFT_TRITON_GRPC)")
    for name in GW_ENV:
        assert any(name in s for s in sources.values()), f"hpeft_serve never reads {name}"


def test_cpu_triton_and_gateway_images_need_no_torch():
    gpu = requirement_names(DEPLOY / "docker" / "requirements-triton.txt")
    cpu = requirement_names(DEPLOY / "docker" / "requirements-triton-cpu.txt")
    assert cpu == (gpu - {"onnxruntime-gpu"}) | {"onnxruntime", "nvidia-pytriton"}  # + the wheel's tritonserver
    gateway = requirement_names(DEPLOY / "docker" / "requirements-gateway.txt")
    assert "torch" not in gateway and {"transformers", "tokenizers"} <= gateway
    for name in ("triton-cpu.Dockerfile", "gateway.Dockerfile"):
        text = (DEPLOY / "docker" / name).read_text()
        assert "--no-deps" in text and "torch" not in re.sub(r"#.*", "", text).replace("'torch'", "")


GATEWAY_IMPORTS = r"""
import sys
for m in ("torch", "onnx", "onnxruntime", "pytriton"):
    sys.modules[m] = None  # absent, as in the gateway image: find_spec says None, import fails
import hpeft_serve.gateway, hpeft_serve.cli.gateway_cmd, uvicorn, fastapi, tritonclient.grpc
from transformers import AutoTokenizer
from hpeft_serve.assets import tokenizer_folder
print(AutoTokenizer.from_pretrained(str(tokenizer_folder("tiny-bert")))(["hello world"])["input_ids"][0])
"""


def test_the_gateway_tokenizes_without_torch():
    out = subprocess.run([sys.executable, "-c", GATEWAY_IMPORTS], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["[101,", "7592,", "2088,", "102]"]


def test_no_build_time_ca_or_pip_conf_reaches_an_image():
    for name in ("triton-cpu.Dockerfile", "gateway.Dockerfile"):
        df = DEPLOY / "docker" / name
        ops = instructions(df)
        assert not [s for s in copy_sources(df) if "pip.conf" in s or s.endswith((".crt", ".pem"))]
        pip_runs = [arg for op, arg in ops if op == "RUN" and "pip install -r" in arg]
        assert pip_runs and all(a.startswith("--mount=type=secret,id=pip_cert ") for a in pip_runs), name
        assert not [a for op, a in ops if op in ("ENV", "ARG") and re.search(r"PIP_CERT|PIP_CONFIG|CA_BUNDLE", a)]


# ----------------------------------------------------------------------------- deploy/check.py (the real run)
def check_module():
    """deploy/check.py's modules, as `python deploy/check.py` imports them (deploy/ first on sys.path)."""
    sys.path.insert(0, str(DEPLOY))
    try:
        import check
        import check_common
        import check_stacks
    finally:
        sys.path.remove(str(DEPLOY))
    return types.SimpleNamespace(**{**vars(check_common), **vars(check_stacks), **vars(check)})


def test_the_real_run_uses_the_shipped_names_and_ports(tmp_path):
    chk = check_module()
    assert chk.TRITON_IMAGE == COMPOSE_CPU["services"]["triton"]["image"]
    assert chk.GATEWAY_IMAGE == COMPOSE["services"]["gateway"]["image"] == container(
        find(BASE, "Deployment", "hpeft-gateway"), "gateway")["image"]
    assert (chk.MODEL, chk.PORTS, chk.GW_PORT) == (CONTRACT["triton"]["model"], PORTS, GW_PORT)
    assert set(chk.ADAPTERS) and all(chk.ADAPTERS[n][0] in ("rotten_tomatoes", "bbc_retrieval") for n in chk.ADAPTERS)
    before = copy.deepcopy(BASE)
    played, secret_docs, triton_pod = chk.kube_manifests(tmp_path / "repo", "hpeft-check-x-", 23456)
    assert BASE == before  # the shipped objects are copied, never changed
    kinds = {o["kind"] for o in BASE}
    assert {o["kind"] for o in played} == set(chk.KUBE_RUNS) - {"Secret"}  # Secrets: podman secrets
    assert set(chk.KUBE_SKIPPED.split(", ")) == kinds - set(chk.KUBE_RUNS)
    deps = {o["metadata"]["name"]: o for o in played if o["kind"] == "Deployment"}
    assert set(deps) == {"hpeft-check-x-hpeft-triton", "hpeft-check-x-hpeft-gateway"}
    assert triton_pod.startswith("hpeft-check-x-hpeft-triton")
    cm = find(played, "ConfigMap", "hpeft-config")["data"]
    assert cm[CONTRACT["gateway"]["env"]["triton"]] == f"{triton_pod}:{PORTS['grpc']}"
    assert cm["HPEFT_ADAPTER_STORE"] == f"{cm['HPEFT_REPO']}/{CONTRACT['triton']['model']}/1/export/packs"
    t = container(deps["hpeft-check-x-hpeft-triton"], "tritonserver")
    shipped = container(find(BASE, "Deployment", "hpeft-triton"), "tritonserver")
    assert t["image"] == chk.TRITON_IMAGE and "nvidia.com/gpu" not in t["resources"]["limits"]
    assert t["args"] == shipped["args"]  # the shipped command line, as is
    # podman 4.3 publishes every containerPort on the host: Triton's go, the gateway's on loopback only
    assert "ports" not in t and t["readinessProbe"]["httpGet"]["port"] == PORTS["http"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in t["volumeMounts"]
    g = container(deps["hpeft-check-x-hpeft-gateway"], "gateway")
    assert {"name": "models", "mountPath": "/models", "readOnly": False} in g["volumeMounts"]
    assert g["ports"] == [{"name": "http", "containerPort": GW_PORT, "hostPort": 23456, "hostIP": "127.0.0.1"}]
    values = {"HPEFT_TRITON_KEY": "k3y", "HPEFT_ADMIN_TOKEN": "t0k", "AWS_ACCESS_KEY_ID": "a",
              "AWS_SECRET_ACCESS_KEY": "s"}
    expanded = container(find(chk.expand_vars(played, values), "Deployment", "hpeft-check-x-hpeft-triton"),
                         "tritonserver")["args"]
    assert "--model-repository=/models" in expanded and expanded[-1].endswith(":hpeft-triton-key=k3y")
    assert not [a for a in expanded if "$(" in a] and "t0k" not in json.dumps(expanded)
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for d in deps.values() for c in d["spec"]["template"]["spec"]
            ["containers"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {"hpeft-check-x-" + d["metadata"]["name"] for d in secret_docs}
    assert {e["name"] for e in t["env"]} == {e["name"] for e in shipped["env"]}  # no admin token added


def test_the_cpu_tritonserver_is_set_up_as_hpeft_serve_sets_it_up(tmp_path):
    import importlib.util
    from hpeft_serve.serving import triton
    spec = importlib.util.spec_from_file_location("triton_cpu_setup", DEPLOY / "docker" / "triton_cpu_setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    inst = triton.TritonInstall(*(tmp_path / n for n in ("bin", "py", "stub", "libs", "caches")))
    served = triton.TritonServer(tmp_path / "repo", work=tmp_path).command(inst)
    assert set(setup.SETUP_FLAGS) <= set(served)
    compose = COMPOSE["services"]["triton"]["command"][1:]
    # what `hpeft serve` adds beyond compose's command line and the wrapper: loopback addresses, its own
    # readiness, shm prefix and exit timeout, the backend and cache folders (the wrapper's, elsewhere)
    rest = {a.split("=", 1)[0] for a in served[1:]} - {a.split("=", 1)[0] for a in compose + setup.SETUP_FLAGS}
    assert rest == {"--backend-directory", "--cache-directory", "--http-address", "--grpc-address",
                    "--metrics-address", "--strict-readiness"}
