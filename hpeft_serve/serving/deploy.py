"""`hpeft deploy EXPORT_DIR --repo model_repository`: put a shared-backbone export into the Triton
repository (model `hpeft`, version 1, folder export/): the graph once, then adapter packs into the
adapter store (export/packs), each written atomically through PackStore. A running server picks new or
replaced packs up on their next request (the runtime checks the store), so adding an adapter never
reloads the model; a new graph (other backbone or new slot kinds, a PHM n included) needs a model
reload, which --url asks for over gRPC."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import HpeftError
from ..names import check_name
from ..pack.check import parse_json
from ..pack.store import PackStore

MODEL = "hpeft"


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy to a temp file of its own (two deploys at once never share one), renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MODEL_PY = '"""Triton Python-backend model `hpeft` (the class lives in hpeft_serve/serving/triton_model.py)."""\n\n' \
    "from hpeft_serve.serving.triton_model import TritonPythonModel  # noqa: F401\n"


def write_model(repo: Path) -> None:
    """Create the model's config.pbtxt and 1/model.py in `repo` where they are missing (a user's edits stay)."""
    model = repo / MODEL
    (model / "1").mkdir(parents=True, exist_ok=True)
    if not (model / "config.pbtxt").is_file():
        (model / "config.pbtxt").write_text((Path(__file__).with_name("config.pbtxt")).read_text())
    if not (model / "1" / "model.py").is_file():
        (model / "1" / "model.py").write_text(MODEL_PY)


def _precision(info: dict) -> str:
    """fp32, int8 or fp16: how an export's graph computes."""
    from .graphs import precision
    return precision(info)[0]


def _place_graph(export_dir: Path, info: dict, target: Path, log) -> bool:
    """Make target's graph serve both what it served and what `export_dir` needs; True if it changed."""
    from ..pack.store import predates_phm_n, served_layout
    old_f = target / "backbone.json"
    old = json.loads(old_f.read_text()) if old_f.is_file() else None
    if old is not None and old.get("backbone", {}).get("sha256") != info["backbone"]["sha256"]:
        raise HpeftError(f"{target} serves backbone {old['backbone'].get('name')!r}; {export_dir} is for "
                         f"{info['backbone'].get('name')!r}: deploy it into another repository")
    if old is not None and _precision(old) != _precision(info):
        raise HpeftError(f"{target} serves a {_precision(old)} graph; {export_dir} is a {_precision(info)} export: "
                         f"re-export it with the served precision, or deploy it into another repository")
    have = served_layout(old, target / "packs") if old else None
    new = served_layout(info, export_dir / "packs")
    if have is not None and have.covers(new):
        return False
    if (have is None or new.covers(have)) and not predates_phm_n(info):
        for f in [info["graph"]] + ([info["graph"] + ".data"] if (export_dir / (info["graph"] + ".data")).exists() else []):
            _copy_atomic(export_dir / f, target / f)
        _copy_atomic(export_dir / "backbone.json", old_f)
        return True
    # each serves slots the other lacks (or the export's graph predates PHM slots per n): export one graph
    # for the union (the adapters already deployed stay)
    from exporters.export import write_shared_graph
    from exporters.quantize import Precision
    from ..backbone import load_backbone
    backbone = load_backbone(info["backbone"]["name"])
    if backbone.sha256 != info["backbone"]["sha256"]:
        raise HpeftError(f"backbone {info['backbone']['name']!r} here differs from the one {export_dir} was exported for")
    log(f"exporting a shared graph for the union of the deployed and the new slot kinds into {target}")
    tmp = target / ".graph-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = write_shared_graph(backbone.build_encoder(), info["backbone"], new if have is None else have.union(new),
                               tmp, (old or info).get("export_format", "onnx"), precision=Precision.of(info))
    for f in files + ["backbone.json"]:  # renames: a running session keeps the files it mapped
        os.replace(tmp / f, target / f)
    shutil.rmtree(tmp, ignore_errors=True)
    return True


def _place_signature_graphs(export_dir: Path, target: Path, log) -> list[str]:
    """Copy the export's signature graphs (graphs/<key>/, serving/graphs.py) that the target lacks, each
    into a temp folder renamed into place; a running model picks them up without a reload (it looks at the
    folder again within a second). Graphs the target's union does not cover are skipped by the runtime."""
    from .graphs import GRAPHS
    placed = []
    for f in sorted((export_dir / GRAPHS).glob("*/backbone.json")):
        key = f.parent.name
        if (target / GRAPHS / key / "backbone.json").is_file():
            continue
        tmp = target / GRAPHS / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for p in sorted(f.parent.iterdir(), key=lambda p: p.name == "backbone.json"):  # the json last
            if p.is_file():
                shutil.copyfile(p, tmp / p.name)
        try:
            os.replace(tmp, target / GRAPHS / key)
            placed.append(key)
        except OSError:  # placed meanwhile by another deploy (the same graph), or a stale folder of that name
            shutil.rmtree(tmp, ignore_errors=True)
    if placed:
        log(f"deployed {len(placed)} signature graph(s) into {target / GRAPHS}")
    return placed


MERGED_PY = '"""Triton Python-backend model for one merged adapter (hpeft_serve/serving/merged_model.py)."""\n\n' \
    "from hpeft_serve.serving.merged_model import TritonPythonModel  # noqa: F401\n"


MERGED_CONFIG = """# {name}: one merged adapter ({method}), from hpeft export --merge
name: "{name}"
backend: "python"
max_batch_size: 64
input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true }}
]
output [ {{ name: "{output}" data_type: TYPE_FP32 dims: [ -1 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "MAX_SEQ_LEN" value {{ string_value: "512" }} }}
"""


def deploy_merged(export_dir: Path, repo: Path, log=print) -> list[str]:
    """Each merged ONNX export `<name>.onnx` becomes its own Triton model `<name>` (inputs input_ids,
    attention_mask; output logits, or embeddings for an embedding adapter), for the few-adapters,
    lowest-latency case."""
    names = []
    for meta_f in sorted(Path(export_dir).glob("*.json")):
        meta = json.loads(meta_f.read_text())
        if meta.get("mode") != "merged" or meta.get("format") != "onnx":
            continue
        name = check_name(meta["name"])
        if name == MODEL:
            raise HpeftError(f"a merged adapter cannot be named {MODEL!r}: that is the shared model's name")
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        output = "embeddings" if meta.get("task") == "embedding" else "logits"
        (repo / name / "config.pbtxt").write_text(MERGED_CONFIG.format(name=name, method=meta["method"], output=output))
        (repo / name / "1" / "model.py").write_text(MERGED_PY)
        _copy_atomic(Path(export_dir) / f"{name}.onnx", repo / name / "1" / "model.onnx")
        names.append(name)
    if not names:
        raise HpeftError(f"{export_dir} holds neither a shared-backbone export (backbone.json) nor a merged ONNX "
                         "export (<name>.onnx + <name>.json): run `hpeft export`")
    log(f"deployed merged model(s) {', '.join(names)} into {repo}")
    return names


def deploy(export_dir: Path, repo: Path, log=print) -> dict:
    export_dir, repo = Path(export_dir), Path(repo)
    info_f = export_dir / "backbone.json"
    if not info_f.is_file():
        return {"graph_changed": False, "packs": [], "merged": deploy_merged(export_dir, repo, log)}
    write_model(repo)
    info = json.loads(info_f.read_text())
    if info.get("export_format") != "onnx":
        raise HpeftError(f"{export_dir} is a {info.get('export_format')} export; model {MODEL!r} serves the ONNX "
                         "graph: export with --format onnx")
    target = repo / MODEL / "1" / "export"
    (target / "packs").mkdir(parents=True, exist_ok=True)
    graph_changed = _place_graph(export_dir, info, target, log)
    _place_signature_graphs(export_dir, target, log)
    packs = sorted(p.stem for p in (export_dir / "packs").glob("*.json"))
    store = PackStore(target / "packs")
    for name in packs:  # each through the store: one writer of a name at a time, tensors before their json
        meta = parse_json((export_dir / "packs" / f"{name}.json").read_bytes(), f"{export_dir}/packs/{name}.json")
        store.write(name, (export_dir / "packs" / f"{name}.safetensors").read_bytes(), meta)
    log(f"deployed {len(packs)} adapter(s) ({', '.join(packs)}) into {target}"
        + ("; the graph changed: the model must (re)load" if graph_changed else ""))
    return {"graph_changed": graph_changed, "packs": packs, "target": str(target)}
