"""Strict checkpoints: a missing, extra, mis-shaped, wrong-dtype or non-finite tensor, a truncated file,
invalid JSON, another format, or another backbone is a CheckpointError that names the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hpeft_serve import checkpoint
from hpeft_serve.errors import CheckpointError
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.training import build_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_bert):
    out = tmp_path_factory.mktemp("ck") / "uni"
    model = build_model(tiny_bert, resolve("unipelt", 2), HeadConfig(2))
    checkpoint.save(model, tiny_bert, out, ("neg", "pos"), {"task": "t"})
    return out


def _copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def _edit_tensors(folder, fn):
    t = load_file(str(folder / "adapter.safetensors"))
    fn(t)
    save_file(t, str(folder / "adapter.safetensors"))


def test_config_records_what_a_user_needs(saved, tiny_bert):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    assert cfg["method"] == "unipelt" and cfg["labels"] == ["neg", "pos"]
    assert cfg["backbone"]["sha256"] == tiny_bert.sha256 and cfg["backbone"]["name"] == "tiny-bert"
    assert cfg["slots"][0]["lora"] == {"q": 8, "v": 8} and cfg["slots"][0]["prefix"] == 10
    assert cfg["slots"][1]["seq_ffn"]["width"] == 8


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("adapters.layers.0.lora.q.lora_A"), r"missing \['adapters.layers.0.lora.q.lora_A'\]"),
    (lambda t: t.__setitem__("adapters.layers.0.extra", torch.zeros(2)), r"unexpected \['adapters.layers.0.extra'\]"),
    (lambda t: t.__setitem__("adapters.layers.0.lora.q.lora_A", torch.zeros(4, 128)), r"lora_A is .* \(4, 128\), expected"),
    (lambda t: t.__setitem__("head.dense.bias", torch.zeros(128, dtype=torch.float16)), "float16"),
    (lambda t: t.__setitem__("head.dense.bias", torch.full((128,), float("nan"))), "NaN"),
])
def test_bad_tensors_are_refused(saved, tmp_path, edit, message):
    folder = _copy(saved, tmp_path)
    _edit_tensors(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(folder)


def test_truncated_or_corrupt_file(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    data = (folder / "adapter.safetensors").read_bytes()
    (folder / "adapter.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(folder)
    (folder / "adapter.safetensors").write_bytes(b"\x80\x04\x95 a pickle, not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        checkpoint.load(folder)


def test_bad_config(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"config": {}, "version": "adapters.1.3.0"}))
    with pytest.raises(CheckpointError, match="hpeft import"):
        checkpoint.load(folder)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        checkpoint.load(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope")


def test_names_are_file_safe(saved, tmp_path, tiny_bert):
    model, _ = checkpoint.load(saved)
    for bad in ("../x", "a/b", ".hidden", "-x", "x" * 200):
        with pytest.raises(CheckpointError, match="name"):
            checkpoint.save(model, tiny_bert, tmp_path / "ok", ("a", "b"), {}, name=bad)
    folder = _copy(saved, tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["name"] = "../../etc"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="invalid"):
        checkpoint.load(folder)
    assert json.loads((checkpoint.save(model, tiny_bert, tmp_path / "dir", ("a", "b"), {}, name="sst-v2")
                       / "adapter_config.json").read_text())["name"] == "sst-v2"


def test_another_backbone_is_refused(saved, tiny_roberta, tmp_path):
    with pytest.raises(CheckpointError, match="trained on backbone 'tiny-bert'"):
        checkpoint.load(saved, backbone=tiny_roberta)
    folder = _copy(saved, tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["backbone"]["sha256"] = "0" * 64
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="sha256 000000000000"):
        checkpoint.load(folder)
