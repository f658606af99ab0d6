"""The `hpeft` command as a user runs it: help, env, train (real data, tiny backbone), search, and clear
errors (exit 2, `error: ...`, never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import keyword_task

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def hpeft(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "hpeft_serve.cli", *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"hpeft {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def test_help_lists_the_commands():
    out = hpeft("--help").stdout
    for cmd in ("train", "search", "env"):
        assert cmd in out
    assert "sparse_adapter" in hpeft("train", "--help").stdout


def test_help_imports_only_the_command_it_describes():
    code = ("import sys; from hpeft_serve.cli import build_parser; build_parser(); a = set(sys.modules); "
            "build_parser('train'); b = set(sys.modules); "
            "print(sorted(m for m in a if m.startswith('hpeft_serve.cli.')), 'train_cmd' in str(b), 'deploy_cmd' in str(b))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True).stdout
    assert out.split() == ["[]", "True", "False"], out


def test_every_setting_has_help_from_its_docstring():
    import dataclasses

    from hpeft_serve.methods.config import COMPONENTS, MethodConfig, settings_help
    fields = {f.name for cls in (*COMPONENTS.values(), MethodConfig) for f in dataclasses.fields(cls)}
    helped = settings_help()
    assert fields - {"type", "extra", "method", "components"} == set(helped)  # a new field needs a docstring
    assert "rank of the update" in helped["r"] and "[lora, default 8]" in helped["r"]
    out = hpeft("train", "--help").stdout
    assert "sparsity:" in out and "fraction of weights pruned" in out


def test_env_prints_versions():
    out = hpeft("env").stdout
    assert "torch " in out and "2.13.0" in out and "transformers" in out and "onnxruntime" in out


def test_train_on_real_data_writes_a_checkpoint(tmp_path):
    out = tmp_path / "rt-lora"
    r = hpeft("train", "--backbone", "tiny-bert", "--method", "lora", "--task", "rotten_tomatoes",
              "--train-size", "48", "--eval-size", "64", "--seed", "3", "--out", out, "--quiet")
    assert "accuracy: 0." in r.stdout.splitlines()[-1]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task"] == "rotten_tomatoes" and cfg["train"]["seed"] == 3 and cfg["labels"] == ["rotten", "fresh"]
    assert 0.0 <= cfg["metrics"]["accuracy"] <= 1.0
    assert (out / "adapter.safetensors").stat().st_size > 0


def test_train_from_a_jsonl_file_with_settings(tmp_path):
    data = keyword_task(64, 16)
    f = tmp_path / "kw.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": data.labels[y]}) + "\n" for t, y in data.train + data.test))
    out = tmp_path / "kw"
    hpeft("train", "--backbone", "tiny-roberta", "--method", "sparse_adapter", "--task", f, "--out", out,
          "--set", "sparsity=0.6", "--set", "pruner=grasp", "--quiet")
    comp = json.loads((out / "adapter_config.json").read_text())["method_config"]["components"][0]
    assert comp["sparsity"] == 0.6 and comp["pruner"] == "grasp"


@pytest.mark.parametrize("args,message", [
    (["train", "--backbone", "nope", "--method", "lora", "--task", "rotten_tomatoes", "--out", "x"], "unknown backbone"),
    (["train", "--backbone", "tiny-bert", "--method", "lora", "--task", "nope", "--out", "x"], "nope"),
    (["train", "--backbone", "tiny-bert", "--method", "lora", "--task", "rotten_tomatoes", "--out", "x",
      "--set", "bogus=1"], "bogus"),
    (["train", "--backbone", "tiny-bert", "--method", "lora", "--task", "rotten_tomatoes", "--out", "x",
      "--train-size", "999999"], "available"),
])
def test_errors_are_clear(args, message, tmp_path):
    r = hpeft(*args, check=False)
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and message in r.stderr
    assert "Traceback" not in r.stderr


def test_search_reports_a_table(tmp_path):
    data = keyword_task(64, 16)
    f = tmp_path / "kw.csv"
    f.write_text("text,label\n" + "".join(f"{t},{data.labels[y]}\n" for t, y in data.train + data.test))
    r = hpeft("search", "--backbone", "tiny-bert", "--task", f, "--train-size", "48", "--eval-size", "16",
              "--trials", "3", "--out", tmp_path / "trials.json")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| trial | G1 | G2 | G3 | G4") and len(lines) == 1 + 3
    cells = lines[2].split(" | ")
    assert cells[1] == "AL" and cells[2] != "AP"  # G1 has no layers on 2 layers: never varied; G2 is
    assert "**best**" in r.stdout
    assert len(json.loads((tmp_path / "trials.json").read_text())) == 3
