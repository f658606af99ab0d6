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


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


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
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())


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
    assert compose["ports"] == [f"{GW_PORT}:{GW_PORT}"]
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
    assert triton["volumes"] == ["../model_repository:/models:ro"]
    assert gateway["volumes"] == ["../model_repository:/models"]
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
    assert {p.name for p in DOCKERFILES} == {"triton.Dockerfile", "gateway.Dockerfile"}
    for df in DOCKERFILES:
        srcs = copy_sources(df)
        assert srcs, df
        allowed = [ln[1:].rstrip("/") for ln in (df.parent / f"{df.name}.dockerignore").read_text().splitlines()
                   if ln.startswith("!")]
        for s in srcs:
            assert (ROOT / s).exists(), f"{df.name} copies {s}, which does not exist"
            assert any(s == a or s.startswith(a + "/") for a in allowed), f"{df.name}: {s} is in the dockerignore"
    for svc in ("triton", "gateway"):
        build = COMPOSE["services"][svc]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "docker" / f"{svc}.Dockerfile"


def test_a_missing_copy_source_is_caught(tmp_path):
    df = tmp_path / "x.Dockerfile"
    df.write_text("FROM scratch\nCOPY hpeft_serve no_such_folder /src/\n")
    assert [s for s in copy_sources(df) if not (ROOT / s).exists()] == ["no_such_folder"]


def test_dockerfiles_expose_and_run_the_contract():
    triton = dict(instructions(DEPLOY / "docker" / "triton.Dockerfile"))
    assert sorted(int(p) for p in triton["EXPOSE"].split()) == sorted(PORTS.values())
    assert CONTRACT["triton"]["probes"]["readiness"] in triton["HEALTHCHECK"]
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
