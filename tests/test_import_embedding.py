"""Embedding imports: AdapterHub adapters saved without a head or with a head that is not a classifier (ignored,
with a note) and peft FEATURE_EXTRACTION LoRAs, made by the libraries (tests/golden, make_golden.py), import as
embedding adapters whose embeddings equal the library's last hidden state pooled the same way (mean over real
tokens, cls, max, L2-normalised; fp32, padded batch of mixed lengths, max abs diff <= 1e-5) -- in PyTorch, in
their merged ONNX export (output `embeddings`) and in ONE shared graph with imported classifiers (each alone
and a batch mixing them: embedding rows give the library's embeddings, classifier rows its logits); the
pooling is the one asked for or the backbone's sentence-transformers config; what cannot be imported
exactly is refused by name."""

from __future__ import annotations

import json
import shutil
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
from tests.test_import import (BERT_FAMILY, GOLDEN, MANIFEST, _backbone, _check, _copy, _edit_config, _expected,
                               _import, refuses_truncated_bin)

EMBEDDING = sorted(c for c in MANIFEST if MANIFEST[c].get("task") == "embedding"  # expected: embeddings_*
                   and MANIFEST[c]["backbone"] in BERT_FAMILY)  # the other families: test_import_families.py
MIXED = {"bert": ["ah-seqbn-nohead-bert", "peft-lora-fe-bert", "ah-seqbn-bert", "peft-lora-bert"],  # + classifiers
         "roberta": ["ah-unipelt-nohead-roberta", "ah-compacterpp-tagging-roberta", "ah-unipelt-roberta"]}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    return {c: import_checkpoint(MANIFEST[c]["library"], GOLDEN / "cases" / c, _backbone(c), root / c,
                                 log=lambda *_: None) for c in sorted(set(EMBEDDING).union(*MIXED.values()))}


def test_the_golden_set_has_each_kind_of_headless_adapter():
    kinds = {(MANIFEST[c]["library"], MANIFEST[c]["head"]) for c in EMBEDDING}
    assert {("adapterhub", "none"), ("adapterhub", "tagging"), ("peft", "none")} <= kinds
    assert {MANIFEST[c]["config"].split(" ")[0] for c in EMBEDDING if MANIFEST[c]["library"] == "peft"} == {
        "LoraConfig", "PrefixTuningConfig"}


@pytest.mark.parametrize("case", EMBEDDING)
def test_headless_adapter_imports_as_an_embedder_giving_the_library_pooled_output(case, imported):
    model, cfg = checkpoint.load(imported[case])
    e = _expected(case)
    with torch.no_grad():
        got = model(e["input_ids"], e["attention_mask"])
    assert got.shape == e["embeddings_mean"].shape  # [batch, hidden]: an embedding, not logits
    _check(f"pytorch embedding {case}", got, e["embeddings_mean"])
    assert cfg["head"]["task"] == "embedding" and cfg["labels"] == [] and cfg["name"] == case
    assert (cfg["head"]["pooling"], cfg["head"]["normalize"]) == ("mean", False)  # the tiny backbone's defaults


@pytest.mark.parametrize("pooling,normalize,key", [
    ("cls", None, "embeddings_cls"), ("max", False, "embeddings_max"), ("mean", True, "embeddings_mean_normalized"),
    (None, True, "embeddings_mean_normalized"),
])
def test_embedding_import_pools_as_asked(pooling, normalize, key, tmp_path):
    case, notes = "ah-seqbn-nohead-bert", []
    out = import_checkpoint("adapterhub", GOLDEN / "cases" / case, _backbone(case), tmp_path / "o", pooling=pooling,
                            normalize=normalize, log=notes.append)
    model, _ = checkpoint.load(out)
    e = _expected(case)
    with torch.no_grad():
        _check(f"pytorch embedding {case} {key}", model(e["input_ids"], e["attention_mask"]), e[key])
    assert notes == [f"note: imported as an embedding adapter: {pooling or 'mean'} pooling, "
                     f"{'L2-normalised' if normalize else 'not normalised'} (as asked)"]


def test_a_head_that_is_not_a_classifier_is_ignored_with_a_note_naming_it(tmp_path):
    notes = []
    case = "ah-compacterpp-tagging-roberta"
    import_checkpoint("adapterhub", GOLDEN / "cases" / case, _backbone(case), tmp_path / "o", log=notes.append)
    assert len(notes) == 2 and "'tagging' head" in notes[0] and "is ignored" in notes[0]
    assert "mean pooling, not normalised (the backbone's defaults)" in notes[1]
    folder = _copy("ah-seqbn-bert", tmp_path)  # a static Hugging Face head of another task: likewise
    (folder / "head_config.json").write_text(json.dumps({"config": None, "model_class": "BertForTokenClassification",
                                                         "num_labels": 3}))
    notes.clear()
    import_checkpoint("adapterhub", folder, _backbone("ah-seqbn-bert"), tmp_path / "o2", log=notes.append)
    assert "head of model class 'BertForTokenClassification' is not a classifier" in notes[0]


def test_embedding_defaults_come_from_the_backbone_sentence_transformers_config(tmp_path):
    bb = tmp_path / "bert-st"  # the golden BERT as a sentence-transformers folder: cls pooling, Normalize
    shutil.copytree(GOLDEN / "backbones" / "bert", bb)
    (bb / "1_Pooling").mkdir()
    (bb / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (bb / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    case = "peft-lora-fe-bert"
    out = import_checkpoint("peft", GOLDEN / "cases" / case, str(bb), tmp_path / "o", log=lambda *_: None)
    model, cfg = checkpoint.load(out)
    assert (cfg["head"]["pooling"], cfg["head"]["normalize"]) == ("cls", True)
    e = _expected(case)
    with torch.no_grad():
        got = model(e["input_ids"], e["attention_mask"])
    want = torch.nn.functional.normalize(e["embeddings_cls"], dim=1)  # the library's first token, normalised
    _check(f"pytorch embedding {case} st-defaults", got, want)


def test_embedding_imports_refuse_what_they_cannot_import_exactly(tmp_path):
    with pytest.raises(CheckpointError, match="holds a classification head .* --pooling and --normalize"):
        import_checkpoint("adapterhub", GOLDEN / "cases" / "ah-seqbn-bert", _backbone("ah-seqbn-bert"),
                          tmp_path / "o", pooling="mean")
    folder = _copy("ah-seqbn-bert", tmp_path)  # a classifier's options still refused by name
    hc = json.loads((folder / "head_config.json").read_text())
    hc["config"]["head_type"] = "multilabel_classification"
    (folder / "head_config.json").write_text(json.dumps(hc))
    with pytest.raises(CheckpointError, match="'head_type': 'multilabel_classification'"):
        _import(folder, "adapterhub", _backbone("ah-seqbn-bert"), tmp_path)
    with pytest.raises(CheckpointError, match="for a bert model of hidden size 128, the backbone .* is a roberta"):
        _import(GOLDEN / "cases" / "ah-seqbn-nohead-bert", "adapterhub", str(GOLDEN / "backbones" / "roberta"),
                tmp_path)
    with pytest.raises(CheckpointError, match="expected .* for this backbone: the adapter was trained on a different"):
        _import(GOLDEN / "cases" / "peft-lora-fe-bert", "peft", "minilm", tmp_path)  # hidden 384, not 128
    folder = _copy("peft-lora-fe-bert", tmp_path)  # keys without bert./roberta.: the recorded base model says
    _edit_config(folder, lambda c: c.update(base_model_name_or_path=str(GOLDEN / "backbones" / "bert")))
    with pytest.raises(CheckpointError, match="trained on .*bert, a bert model; the backbone .* is a roberta"):
        _import(folder, "peft", str(GOLDEN / "backbones" / "roberta"), tmp_path)
    folder = _copy("peft-prefix-fe-roberta", tmp_path)
    _edit_config(folder, lambda c: c.update(num_layers=3))
    with pytest.raises(CheckpointError, match=r"prefix config \{'num_layers': 3\} does not fit backbone"):
        _import(folder, "peft", _backbone("peft-prefix-fe-roberta"), tmp_path)
    with pytest.raises(HpeftError, match="--merge"):  # shifted positions: no slot in the shared layout
        export_checkpoint(import_checkpoint("peft", GOLDEN / "cases" / "peft-prefix-fe-bert", _backbone(
            "peft-prefix-fe-bert"), tmp_path / "pfx", log=lambda *_: None), tmp_path / "shared", "onnx",
            log=lambda *_: None)
    refuses_truncated_bin("ah-unipelt-nohead-roberta", tmp_path)


def test_peft_feature_extractor_lora_on_the_pooler_is_ignored_with_a_note(tmp_path):
    folder = _copy("peft-lora-fe-bert", tmp_path)
    t = load_file(str(folder / "adapter_model.safetensors"))
    t["base_model.model.pooler.dense.lora_A.weight"] = torch.ones(4, 128)
    t["base_model.model.pooler.dense.lora_B.weight"] = torch.ones(128, 4)
    save_file(t, str(folder / "adapter_model.safetensors"))
    notes = []
    out = import_checkpoint("peft", folder, _backbone("peft-lora-fe-bert"), tmp_path / "o", log=notes.append)
    assert "LoRA on the pooler (pooler.dense) is ignored" in notes[0]
    model, _ = checkpoint.load(out)
    e = _expected("peft-lora-fe-bert")
    with torch.no_grad():
        _check("pytorch embedding pooler-lora", model(e["input_ids"], e["attention_mask"]), e["embeddings_mean"])


def test_cli_embedding_import_takes_pooling_flags_and_prints_the_notes(tmp_path, capsys):
    from hpeft_serve.cli import main
    case = "ah-compacterpp-tagging-roberta"
    assert main(["import", "adapterhub", str(GOLDEN / "cases" / case), "--backbone", _backbone(case), "--out",
                 str(tmp_path / "emb"), "--pooling", "cls", "--normalize"]) in (0, None)
    out = capsys.readouterr().out
    assert "note:" in out and "'tagging' head" in out and "cls pooling, L2-normalised (as asked)" in out
    head = checkpoint.read_config(tmp_path / "emb")["head"]
    assert (head["task"], head["pooling"], head["normalize"]) == ("embedding", "cls", True)
    assert main(["import", "adapterhub", str(GOLDEN / "cases" / "ah-seqbn-bert"), "--backbone",
                 _backbone("ah-seqbn-bert"), "--out", str(tmp_path / "c"), "--no-normalize"]) == 2
    assert "--pooling and --normalize apply to adapters saved without a classifier" in capsys.readouterr().err


# ---------------------------------------------------------------- export and the shared graph
def _ort(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", EMBEDDING)
def test_merged_onnx_of_an_imported_embedder_outputs_the_library_embeddings(case, imported, tmp_path):
    export_checkpoint(imported[case], tmp_path, "onnx", merged=True, log=lambda *_: None)
    sess = _ort(tmp_path / f"{case}.onnx")
    assert [o.name for o in sess.get_outputs()] == ["embeddings"]
    e = _expected(case)
    got = sess.run(["embeddings"], {"input_ids": e["input_ids"].numpy(), "attention_mask": e["attention_mask"].numpy()})
    _check(f"onnx merged embedding {case}", got[0], e["embeddings_mean"])


@pytest.mark.parametrize("arch", sorted(MIXED))
def test_one_shared_graph_serves_imported_embedders_and_classifiers_alone_and_mixed(arch, imported, tmp_path):
    cases = MIXED[arch]
    for c in cases:
        export_checkpoint(imported[c], tmp_path, "onnx", log=lambda *_: None)
    assert read_layout(tmp_path).embeddings
    sess = _ort(tmp_path / "backbone.onnx")
    packs = [(load_file(str(tmp_path / "packs" / f"{c}.safetensors")),
              json.loads((tmp_path / "packs" / f"{c}.json").read_text())["sizes"]) for c in cases]
    feed = {k: v.numpy() for k, v in bank_feed(stack(packs), read_layout(tmp_path)).items()}
    e0 = _expected(cases[0])  # every case of a backbone has the same inputs
    base = {"input_ids": e0["input_ids"].numpy(), "attention_mask": e0["attention_mask"].numpy()}
    rows = len(e0["input_ids"])

    def check_row(tag, c, r, logits, emb):
        want = _expected(c)
        if c in EMBEDDING:
            _check(tag, emb[r:r + 1], want["embeddings_mean"][r:r + 1])
        else:
            _check(tag, logits[r:r + 1], want["logits"][r:r + 1])

    for k, c in enumerate(cases):  # each alone
        logits, emb = sess.run(["logits", "embeddings"], base | {"adapter_index": np.full(rows, k, np.int64)} | feed)
        for r in range(rows):
            check_row(f"onnx shared embedding {c}", c, r, logits, emb)
    idx = (np.arange(rows) + 1) % len(cases)  # one forward, a different adapter per row, embedders and classifiers
    assert {cases[k] in EMBEDDING for k in idx} == {True, False}
    logits, emb = sess.run(["logits", "embeddings"], base | {"adapter_index": idx} | feed)
    for r, k in enumerate(idx):
        check_row(f"onnx shared embedding mixed {arch}", cases[k], r, logits, emb)


def test_report_max_diffs():
    """Prints the largest embedding differences measured above (run with -s)."""
    from tests.test_import import MAX_DIFF
    for kind in ("pytorch embedding", "onnx merged embedding", "onnx shared embedding"):
        got = {k: v for k, v in MAX_DIFF.items() if k.startswith(kind)}
        if got:
            print(f"\n{kind}: max abs diff {max(got.values()):.2e} over {len(got)} checks")
