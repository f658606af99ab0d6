"""Import: AdapterHub and peft checkpoints made by the original libraries (tests/golden, see make_golden.py)
give the libraries' logits on a padded batch of mixed lengths (fp32, max abs diff <= 1e-5) -- imported in
PyTorch, exported merged to ONNX, and served from the shared-backbone graph (each adapter alone and a batch
mixing them); what is not modelled, a .bin that would run code, a mismatched backbone and corrupt files are
refused with a message naming the problem. Head-less adapters (embedding imports): test_import_embedding.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from exporters.export import export_checkpoint, read_layout
from exporters.layout import bank_feed, stack
from hpeft_serve import checkpoint
from hpeft_serve.errors import CheckpointError, HpeftError
from hpeft_serve.importers import import_checkpoint
from hpeft_serve.importers.torch_bin import load_state_dict

TOL = 1e-5
GOLDEN = Path(__file__).parent / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())["cases"]
BERT_FAMILY = ("bert", "roberta", "xlmr")  # the other families' cases: tests/test_import_families.py
CASES = sorted(c for c in MANIFEST if MANIFEST[c].get("task") != "embedding"  # classifiers: expected logits
               and MANIFEST[c]["backbone"] in BERT_FAMILY)
SHIFTED = {c for c in CASES if c.startswith("peft-prefix")}  # positions shift: merged export only
MAX_DIFF: dict[str, float] = {}  # what the tests measured, printed at the end with -s


def _backbone(case: str) -> str:
    return str(GOLDEN / "backbones" / MANIFEST[case]["backbone"])


def _expected(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "expected" / f"{case}.safetensors"))


def _check(key: str, got, want: torch.Tensor) -> None:
    diff = float(np.abs(np.asarray(got)[:, :want.shape[1]] - want.numpy()).max())
    MAX_DIFF[key] = diff
    assert diff <= TOL, f"{key}: max abs diff {diff:.2e}"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    return {c: import_checkpoint(MANIFEST[c]["library"], GOLDEN / "cases" / c, _backbone(c), root / c,
                                 log=lambda *_: None) for c in CASES}


@pytest.mark.parametrize("case", CASES)
def test_imported_model_gives_the_library_logits(case, imported):
    model, cfg = checkpoint.load(imported[case])
    e = _expected(case)
    with torch.no_grad():
        _check(f"pytorch {case}", model(e["input_ids"], e["attention_mask"]), e["logits"])
    assert cfg["imported_from"]["library"] == MANIFEST[case]["library"] and cfg["name"] == case


@pytest.mark.parametrize("case", CASES)
def test_merged_onnx_gives_the_library_logits(case, imported, tmp_path):
    export_checkpoint(imported[case], tmp_path, "onnx", merged=True, log=lambda *_: None)
    sess = ort.InferenceSession(str(tmp_path / f"{case}.onnx"), providers=["CPUExecutionProvider"])
    e = _expected(case)
    got = sess.run(["logits"], {"input_ids": e["input_ids"].numpy(), "attention_mask": e["attention_mask"].numpy()})
    _check(f"onnx merged {case}", got[0], e["logits"])


@pytest.mark.parametrize("arch", ["bert", "roberta", "xlmr"])
def test_shared_graph_gives_the_library_logits_alone_and_mixed(arch, imported, tmp_path):
    cases = [c for c in CASES if MANIFEST[c]["backbone"] == arch and c not in SHIFTED]
    for c in cases:  # all adapters of a backbone into one folder: the graph grows to the union of their slots
        export_checkpoint(imported[c], tmp_path, "onnx", log=lambda *_: None)
    sess = ort.InferenceSession(str(tmp_path / "backbone.onnx"), providers=["CPUExecutionProvider"])
    packs = [(load_file(str(tmp_path / "packs" / f"{c}.safetensors")),
              json.loads((tmp_path / "packs" / f"{c}.json").read_text())["sizes"]) for c in cases]
    feed = {k: v.numpy() for k, v in bank_feed(stack(packs), read_layout(tmp_path)).items()}
    e0 = _expected(cases[0])  # every case of a backbone has the same inputs
    base = {"input_ids": e0["input_ids"].numpy(), "attention_mask": e0["attention_mask"].numpy()}
    rows = len(e0["input_ids"])
    for k, c in enumerate(cases):
        got = sess.run(["logits"], base | {"adapter_index": np.full(rows, k, np.int64)} | feed)[0]
        _check(f"onnx shared {c}", got, _expected(c)["logits"])
    idx = np.arange(rows) % len(cases)  # one batch, a different adapter per row (same padding as the golden)
    got = sess.run(["logits"], base | {"adapter_index": idx} | feed)[0]
    for r, k in enumerate(idx):
        want = _expected(cases[k])["logits"][r:r + 1]
        _check(f"onnx shared mixed {arch}", got[r:r + 1], want)


def test_shifted_prefix_is_refused_by_the_shared_layout(imported, tmp_path):
    with pytest.raises(HpeftError, match="--merge"):
        export_checkpoint(imported["peft-prefix-bert"], tmp_path, "onnx", log=lambda *_: None)


def test_imported_config_records_the_exact_semantics(imported):
    unipelt = checkpoint.read_config(imported["ah-unipelt-roberta"])
    assert unipelt["method"] == "unipelt" and unipelt["method_config"]["gate_pooling"] == "all"
    assert unipelt["head"]["pooling"] == "cls" and unipelt["labels"] == ["label0", "label1"]
    old = checkpoint.read_config(imported["ah-lora-pre110-bert"])["method_config"]["components"][0]
    assert old["alpha"] == old["r"] == 4  # adapters < 1.1.0 ignored alpha
    rs = checkpoint.read_config(imported["peft-lora-rslora-roberta"])["method_config"]["components"]
    assert all(c["rslora"] for c in rs) and {c["r"] for c in rs} == {8, 2}
    assert {c["alpha"] for c in rs if c["targets"] == ["v"]} == {12.0}


# ---------------------------------------------------------------- refusals
def _copy(case: str, tmp_path: Path) -> Path:
    dst = tmp_path / case
    shutil.copytree(GOLDEN / "cases" / case, dst)
    return dst


def _edit_config(folder: Path, edit) -> None:
    f = folder / "adapter_config.json"
    cfg = json.loads(f.read_text())
    edit(cfg)
    f.write_text(json.dumps(cfg))


def _import(case_dir: Path, library: str, backbone: str, tmp_path: Path):
    return import_checkpoint(library, case_dir, backbone, tmp_path / "out")


@pytest.mark.parametrize("edit,named", [
    (lambda c: c["config"].update(ln_after=True), "ln_before/ln_after"),
    (lambda c: c["config"].update(scaling="channel"), "scaling='channel'"),
    (lambda c: c["config"].update(non_linearity="mish"), "activation 'mish'"),
    (lambda c: c["config"].update(some_new_option=3), "some_new_option"),
    (lambda c: c.update(config={"architecture": "prompt_tuning"}), "architecture 'prompt_tuning'"),
    (lambda c: c.update(model_type="t5"), "model_type 't5'"),
])
def test_unsupported_adapterhub_options_are_refused_by_name(edit, named, tmp_path):
    folder = _copy("ah-seqbn-bert", tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(").replace(")", r"\)")):
        _import(folder, "adapterhub", _backbone("ah-seqbn-bert"), tmp_path)


@pytest.mark.parametrize("edit,named", [
    (lambda c: c.update(use_dora=True), "use_dora"),
    (lambda c: c.update(lora_bias=True), "lora_bias"),
    (lambda c: c.update(bias="all"), "bias='all'"),
    (lambda c: c.update(peft_type="LOHA"), "peft_type 'LOHA'"),
    (lambda c: c.update(task_type="CAUSAL_LM"), "task_type 'CAUSAL_LM'"),
])
def test_unsupported_peft_options_are_refused_by_name(edit, named, tmp_path):
    folder = _copy("peft-lora-bert", tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(CheckpointError, match=named):
        _import(folder, "peft", _backbone("peft-lora-bert"), tmp_path)


def test_peft_ia3_imports_its_scales_and_refuses_another_orientation(imported, tmp_path):
    """peft's BERT default: k, v on the output; o and ffn_out (both `output.dense`) on the input. A key vector
    saved as feedforward (1, in) scales the key's input, which hpeft has no slot for: refused by name."""
    comps = checkpoint.read_config(imported["peft-ia3-bert"])["method_config"]["components"]
    assert [(c["type"], c["targets"]) for c in comps] == [("ia3", ["k", "v", "o", "ffn_out"])]
    folder = _copy("peft-ia3-bert", tmp_path)
    f = folder / "adapter_model.safetensors"
    t = load_file(str(f))
    key = "base_model.model.bert.encoder.layer.1.attention.self.key.ia3_l"
    t[key] = t[key].reshape(1, -1).contiguous()
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=r"\(IA\)\^3 on encoder.layer.1.attention.self.key scales its input"):
        _import(folder, "peft", _backbone("peft-ia3-bert"), tmp_path)


def test_mismatched_backbone_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="for a bert model of hidden size 128, the backbone .* is a xlm-roberta"):
        _import(GOLDEN / "cases" / "ah-mam-bert", "adapterhub", str(GOLDEN / "backbones" / "xlmr"), tmp_path)
    with pytest.raises(CheckpointError, match="for a bert model, the backbone .* is a roberta"):
        _import(GOLDEN / "cases" / "peft-lora-bert", "peft", str(GOLDEN / "backbones" / "roberta"), tmp_path)
    with pytest.raises(CheckpointError, match="no pooler"):  # tiny-bert: same shapes, but no pooler for the head
        _import(GOLDEN / "cases" / "peft-lora-bert", "peft", "tiny-bert", tmp_path)
    with pytest.raises(CheckpointError, match="RoBERTa / XLM-R"):
        _import(GOLDEN / "cases" / "peft-prefix-bert", "peft", str(GOLDEN / "backbones" / "roberta"), tmp_path)
    for family in ("tiny-distilbert", "tiny-electra", "tiny-deberta-v2"):  # another family: refused by name
        with pytest.raises(CheckpointError, match=r"LoRA tensors are for a bert model, the backbone \S+ is a "):
            _import(GOLDEN / "cases" / "peft-lora-bert", "peft", family, tmp_path)
        with pytest.raises(CheckpointError, match=r"for a bert model of hidden size 128, the backbone \S+ is a "):
            _import(GOLDEN / "cases" / "ah-seqbn-bert", "adapterhub", family, tmp_path)


def test_corrupt_files_are_refused(tmp_path):
    folder = _copy("ah-compacter-bert", tmp_path)
    w = folder / "adapter.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _import(folder, "adapterhub", _backbone("ah-compacter-bert"), tmp_path)
    refuses_truncated_bin("ah-mam-bert", tmp_path)


def refuses_truncated_bin(case: str, tmp_path: Path) -> None:
    """The case's pytorch_adapter.bin cut short is refused as corrupt, and nothing is written."""
    folder = _copy(case, tmp_path)
    w = folder / "pytorch_adapter.bin"
    w.write_bytes(w.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="corrupt"):
        _import(folder, "adapterhub", _backbone(case), tmp_path)
    assert not (tmp_path / "out").exists()  # nothing half-written


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copy, (__file__, str(self.marker)))  # would write a file when unpickled


def test_a_bin_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path):
    folder = _copy("ah-mam-bert", tmp_path)
    marker = tmp_path / "pwned"
    sd = load_state_dict(folder / "pytorch_adapter.bin")
    torch.save({**sd, "evil": _Evil(marker)}, folder / "pytorch_adapter.bin")
    with pytest.raises(CheckpointError, match="shutil.copy, which could run code"):
        _import(folder, "adapterhub", _backbone("ah-mam-bert"), tmp_path)
    assert not marker.exists()
    torch.load(folder / "pytorch_adapter.bin", weights_only=False)  # the file really is an exploit for plain torch.load
    assert marker.exists()


def test_bin_loader_keeps_values_and_refuses_non_state_dicts(tmp_path):
    sd = load_state_dict(GOLDEN / "cases" / "ah-union-xlmr" / "pytorch_adapter.bin")
    ref = torch.load(GOLDEN / "cases" / "ah-union-xlmr" / "pytorch_adapter.bin", weights_only=True)
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    torch.save([1, 2], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.bin")
    with zipfile.ZipFile(tmp_path / "nopkl.bin", "w") as z:
        z.writestr("x/readme", "hi")
    with pytest.raises(CheckpointError, match="no single data.pkl"):
        load_state_dict(tmp_path / "nopkl.bin")


def _rezip(src: Path, dst: Path, compression=zipfile.ZIP_DEFLATED, edit=lambda name, data: data) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info)))


def test_bin_sizes_are_checked_before_anything_is_inflated(tmp_path):
    """A zip bomb (64 MiB of storage deflated to ~64 KiB, records consistent with it) and a storage whose
    declared size disagrees with its record are refused by the sizes the archive declares, unread."""
    torch.save({"w": torch.zeros(16 << 20)}, tmp_path / "big.bin")
    _rezip(tmp_path / "big.bin", tmp_path / "bomb.bin")
    assert (tmp_path / "bomb.bin").stat().st_size < (1 << 20)
    with pytest.raises(CheckpointError, match="before it is inflated"):
        load_state_dict(tmp_path / "bomb.bin")
    torch.save({"w": torch.arange(8.0)}, tmp_path / "small.bin")
    _rezip(tmp_path / "small.bin", tmp_path / "short.bin", zipfile.ZIP_STORED,
           lambda name, data: data[:-4] if "/data/" in name else data)  # one value fewer than the record says
    with pytest.raises(CheckpointError, match="declares 28 bytes for 8 values"):
        load_state_dict(tmp_path / "short.bin")
    _rezip(tmp_path / "small.bin", tmp_path / "same.bin", zipfile.ZIP_STORED)
    assert torch.equal(load_state_dict(tmp_path / "same.bin")["w"], torch.arange(8.0))  # a faithful copy still loads


def test_cli_imports_then_exports_and_refuses_with_status_2(tmp_path):
    ck, ex = tmp_path / "rt-unipelt", tmp_path / "export"
    script = "import sys; from hpeft_serve.cli import main; a = sys.argv[1:]; sys.exit(main(a[:7]) or main(a[7:]))"
    cmd = [sys.executable, "-c", script, "import", "adapterhub", str(GOLDEN / "cases" / "ah-unipelt-roberta"),
           "--backbone", str(GOLDEN / "backbones" / "roberta"), "--out", str(ck), "export", str(ck), "--out", str(ex),
           "--merge"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert (ck / "adapter_config.json").exists() and (ex / "rt-unipelt.onnx").exists()
    bad = _copy("peft-lora-bert", tmp_path)
    _edit_config(bad, lambda c: c.update(use_dora=True))
    r = subprocess.run([sys.executable, "-m", "hpeft_serve.cli", "import", "peft", str(bad), "--backbone",
                        _backbone("peft-lora-bert"), "--out", str(tmp_path / "o")], capture_output=True, text=True, check=False,
                       timeout=300)
    assert r.returncode == 2 and "use_dora" in r.stderr and "Traceback" not in r.stderr


def test_report_max_diffs():
    """Prints the largest differences measured above (run with -s)."""
    for kind in ("pytorch", "onnx merged", "onnx shared"):
        got = {k: v for k, v in MAX_DIFF.items() if k.startswith(kind)}
        if got:
            print(f"\n{kind}: max abs diff {max(got.values()):.2e} over {len(got)} checks")


def test_imported_adapters_served_by_tritonserver_give_the_library_outputs(imported, tmp_path):
    """An imported checkpoint is a normal checkpoint: exported, deployed and served by the real tritonserver
    (the BERT cases, several libraries and methods in one graph, classifiers and head-less embedders), each
    answers the library's logits or pooled embeddings, alone and in one request mixing them."""
    import tritonclient.grpc as grpcclient

    from hpeft_serve.serving.client import free_ports, hpeft_inputs
    from hpeft_serve.serving.deploy import deploy
    from hpeft_serve.serving.triton import TritonServer
    cases = [c for c in CASES if MANIFEST[c]["backbone"] == "bert" and c not in SHIFTED]
    assert {MANIFEST[c]["library"] for c in cases} == {"adapterhub", "peft"}
    embedders = [c for c in sorted(MANIFEST) if MANIFEST[c].get("task") == "embedding"
                 and MANIFEST[c]["backbone"] == "bert" and not c.startswith("peft-prefix")]  # not shifted
    folders = {c: imported[c] for c in cases} | {c: import_checkpoint(
        MANIFEST[c]["library"], GOLDEN / "cases" / c, _backbone(c), tmp_path / "emb" / c, log=lambda *_: None)
        for c in embedders}
    for c, folder in folders.items():
        export_checkpoint(folder, tmp_path / "export", "onnx", log=lambda *_: None)
    deploy(tmp_path / "export", tmp_path / "repo", log=lambda *_: None)
    http, grpc, metrics = free_ports()
    e0 = _expected(cases[0])  # every BERT case has the same inputs
    ids, mask = e0["input_ids"].numpy(), e0["attention_mask"].numpy()
    with TritonServer(tmp_path / "repo", http, grpc, metrics, work=tmp_path / "work"):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")

        def infer(names):
            r = client.infer("hpeft", hpeft_inputs(grpcclient, ids, mask, names))
            return r.as_numpy("logits"), r.as_numpy("embeddings").reshape(len(names), -1)

        for c in folders:
            logits, emb = infer([c] * len(ids))
            e = _expected(c)
            _check(f"tritonserver {c}", emb if c in embedders else logits, e.get("embeddings_mean", e.get("logits")))
        names = [embedders[0], cases[0], embedders[-1], cases[-1]][:len(ids)]  # one request, both kinds
        logits, emb = infer(names)
        for r, c in enumerate(names):
            e = _expected(c)
            got, want = (emb, e["embeddings_mean"]) if c in embedders else (logits, e["logits"])
            _check(f"tritonserver mixed {c}", got[r:r + 1], want[r:r + 1])
