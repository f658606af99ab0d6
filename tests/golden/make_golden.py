"""Golden fixtures for tests/test_import.py and test_import_embedding.py, made with the original libraries.

Writes, under tests/golden/:
- backbones/{bert,roberta,xlmr}/: tiny random Hugging Face backbones (hidden 128, 2 layers, vocab 200),
  config.json + model.safetensors, the folders `hpeft import --backbone` takes;
- cases/<case>/: an adapter checkpoint exactly as the library saved it (AdapterHub `save_adapter` with its
  head, or without / with a tagging head for the embedding cases, or peft `save_pretrained`), every adapter
  tensor perturbed away from its (often zero) init so that a wrong import cannot pass; the two legacy cases
  are hand-edited to the older on-disk form afterwards;
- expected/<case>.safetensors: input_ids, attention_mask (a padded batch of mixed lengths) and the logits
  the library computes (eval mode) after loading the saved folder back into a fresh model;
- embedding cases (head-less adapters: AdapterHub saved without head or with a head that is not a classifier,
  peft FEATURE_EXTRACTION): instead of logits, the library's last hidden state pooled as a sentence embedder
  pools it: embeddings_mean (over real tokens), embeddings_cls (first token), embeddings_max (over real
  tokens) and embeddings_mean_normalized (L2);
- manifest.json: per case the library, backbone, config and what it covers; the library versions.

The environment (keep it out of the project's venv: adapters 1.3.0 pins transformers ~=4.57.6):

    python3 -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install torch==2.13.0 adapters==1.3.0 peft==0.21.2 safetensors
    /tmp/golden-venv/bin/python tests/golden/make_golden.py

Re-running rewrites every file (seeded, so the same versions give the same tensors).
`make_golden.py --only peft-ia3` makes only the cases whose name starts with that (peft alone suffices for
peft cases; the backbones and the other cases are kept) and updates manifest.json.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VOCAB, SEQ = 200, 12
LENGTHS = (12, 7, 3, 9)  # real tokens per row: a padded batch of mixed lengths


# ---------------------------------------------------------------- backbones
def backbone_configs():
    from transformers import BertConfig, RobertaConfig, XLMRobertaConfig
    common = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=256)
    return {
        "bert": BertConfig(**common, max_position_embeddings=64),
        "roberta": RobertaConfig(**common, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                                 eos_token_id=2, type_vocab_size=1, layer_norm_eps=1e-5),
        "xlmr": XLMRobertaConfig(**common, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                                 eos_token_id=2, type_vocab_size=1, layer_norm_eps=1e-5),
    }


def make_backbones() -> dict[str, Path]:
    from transformers import AutoModel
    out = {}
    for i, (name, cfg) in enumerate(backbone_configs().items()):
        torch.manual_seed(100 + i)
        model = AutoModel.from_config(cfg)  # with pooler: BERT's sequence-classification head uses it
        with torch.no_grad():  # non-trivial biases and LayerNorms, so a mix-up of them shows
            for n, p in model.named_parameters():
                if n.endswith("bias") or "LayerNorm" in n:
                    p.add_(torch.randn_like(p) * 0.05)
        folder = HERE / "backbones" / name
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder, safe_serialization=True)
        out[name] = folder
    return out


def inputs(arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    pad = 0 if arch == "bert" else 1
    ids = torch.randint(3, VOCAB, (len(LENGTHS), SEQ), generator=g)
    ids[:, 0] = 2 if arch == "bert" else 0  # a first (CLS / <s>) token
    mask = torch.zeros_like(ids)
    for r, n in enumerate(LENGTHS):
        mask[r, :n] = 1
        ids[r, n:] = pad
    return ids, mask


def perturb(model, match, seed: int) -> None:
    """Add noise to every adapter/head tensor (zero-initialised up-projections and LoRA B included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen = set()
        for n, p in model.named_parameters():
            if match(n) and id(p) not in seen:  # prefix tensors are aliased across layers: perturb once
                seen.add(id(p))
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------- AdapterHub cases
def adapterhub_cases():
    from adapters import (
        CompacterConfig,
        CompacterPlusPlusConfig,
        ConfigUnion,
        DoubleSeqBnConfig,
        LoRAConfig,
        MAMConfig,
        ParBnConfig,
        PrefixTuningConfig,
        SeqBnConfig,
        UniPELTConfig,
    )
    small_prefix = dict(prefix_length=8, bottleneck_size=64)  # the MLP sizes keep the files small
    return [
        # case, backbone, config, config class, safetensors?, head ("flex" or "static"), labels
        ("ah-mam-bert", "bert", MAMConfig(PrefixTuningConfig(**small_prefix), ParBnConfig(reduction_factor=4)),
         "MAMConfig", False, "flex", 3),
        ("ah-unipelt-roberta", "roberta", UniPELTConfig(PrefixTuningConfig(**small_prefix)), "UniPELTConfig",
         False, "flex", 2),
        ("ah-compacter-bert", "bert", CompacterConfig(), "CompacterConfig", True, "flex", 2),
        ("ah-compacterpp-xlmr", "xlmr", CompacterPlusPlusConfig(reduction_factor=8, phm_rank=2),
         "CompacterPlusPlusConfig", True, "flex", 3),
        ("ah-prefix-mlp-roberta", "roberta", PrefixTuningConfig(**small_prefix), "PrefixTuningConfig", False,
         "flex", 2),
        ("ah-prefix-flat-bert", "bert", PrefixTuningConfig(prefix_length=6, flat=True), "PrefixTuningConfig(flat)",
         False, "flex", 2),
        ("ah-lora-xlmr", "xlmr", LoRAConfig(r=4, alpha=16, attn_matrices=["q", "k", "v"], intermediate_lora=True,
                                            output_lora=True, leave_out=[1]), "LoRAConfig", True, "flex", 2),
        ("ah-seqbn-bert", "bert", SeqBnConfig(reduction_factor={"0": 4, "default": 16}), "SeqBnConfig", True,
         "flex", 2),
        ("ah-parbn-roberta", "roberta", ParBnConfig(scaling="learned"), "ParBnConfig", True, "static", 3),
        ("ah-union-xlmr", "xlmr", ConfigUnion(LoRAConfig(r=8, alpha=16), SeqBnConfig(reduction_factor=8),
                                              PrefixTuningConfig(prefix_length=5, flat=True)),
         "ConfigUnion(LoRA, SeqBn, flat prefix)", False, "flex", 2),
        ("ah-lora-pre110-bert", "bert", LoRAConfig(r=4, alpha=16), "LoRAConfig (saved by adapters 1.0.1)", True,
         "flex", 2),
        ("ah-seqbn-legacy-bert", "bert", SeqBnConfig(non_linearity="gelu_new"),
         "SeqBnConfig (adapter-transformers form)", False, "flex", 2),
        ("ah-doubleseqbn-roberta", "roberta", DoubleSeqBnConfig(reduction_factor=8, use_gating=True),
         "DoubleSeqBnConfig (gated)", True, "flex", 2),
    ]


def _ah_model(backbone: Path, head: str, labels: int):
    import adapters
    from adapters import AutoAdapterModel
    from transformers import AutoModelForSequenceClassification
    if head == "flex":
        return AutoAdapterModel.from_pretrained(backbone)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=labels)
    adapters.init(model)
    return model


def make_adapterhub_case(case, arch, config, backbone: Path, safetensors: bool, head: str, labels: int, seed: int):
    torch.manual_seed(seed)
    name = case.replace("-", "_")
    model = _ah_model(backbone, head, labels)
    model.add_adapter(name, config=config)
    id2label = {i: f"label{i}" for i in range(labels)}
    if head == "flex":
        model.add_classification_head(name, num_labels=labels, id2label=id2label)
    else:
        model.config.id2label, model.config.label2id = id2label, {v: k for k, v in id2label.items()}
    model.train_adapter(name)
    model.set_active_adapters(name)
    perturb(model, lambda n: f".{name}." in n or n.startswith((f"heads.{name}.", "classifier.")), seed)
    folder = HERE / "cases" / case
    shutil.rmtree(folder, ignore_errors=True)
    model.save_adapter(str(folder), name, with_head=True, use_safetensors=safetensors)
    ids, mask = inputs(arch)
    model.eval()
    with torch.no_grad():
        direct = model(input_ids=ids, attention_mask=mask).logits
    return folder, name, direct


def legacy_edits(case: str, folder: Path, name: str) -> None:
    """Rewrite a saved checkpoint into the form an older library wrote."""
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    if case == "ah-lora-pre110-bert":  # adapters < 1.1.0 ignored alpha (scaling 1.0): the loader sets alpha = r
        cfg["version"] = "adapters.1.0.1"
    elif case == "ah-seqbn-legacy-bert":  # adapter-transformers: no version, "gelu" meant tanh-GELU, old keys
        del cfg["version"]
        c = cfg["config"]
        c["non_linearity"] = "gelu"
        del c["inv_adapter"], c["inv_adapter_reduction_factor"]
        c["invertible_adapter"] = {"block_type": "nice", "non_linearity": "relu", "reduction_factor": 2}
        cfg["type"] = "text_task"
        weights = folder / "pytorch_adapter.bin"
        sd = torch.load(weights, weights_only=True)
        sd = {k.replace(".output.adapters.", ".output.layer_text_task_adapters."): v for k, v in sd.items()}
        torch.save(sd, weights)
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def reload_adapterhub(folder: Path, backbone: Path, arch: str, head: str, labels: int) -> torch.Tensor:
    model = _ah_model(backbone, head, labels)
    name = model.load_adapter(str(folder), set_active=True, use_safetensors=(folder / "adapter.safetensors").exists())
    model.set_active_adapters(name)
    model.eval()
    ids, mask = inputs(arch)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---------------------------------------------------------------- peft cases
def peft_cases():
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType
    return [
        ("peft-lora-bert", "bert", LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                               target_modules=["query", "value", "intermediate.dense"]), 2),
        ("peft-lora-rslora-roberta", "roberta", LoraConfig(
            task_type=TaskType.SEQ_CLS, r=8, lora_alpha=4, use_rslora=True,
            target_modules=["query", "key", "value", "attention.output.dense", "output.dense"],
            rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"value": 12}), 3),
        # prefix tuning for sequence classification runs on BERT only: on RoBERTa / XLM-R peft 0.21 feeds the
        # cache to the classifier (outputs[1] of a model without pooler) and fails
        ("peft-prefix-mlp-bert", "bert", PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=6,
                                                            prefix_projection=True, encoder_hidden_size=32), 2),
        ("peft-prefix-bert", "bert", PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=5), 3),
        # peft's default for BERT: key, value and output.dense, which ends the attention output's name too, all
        # three `output.dense` feedforward (input scaled)
        ("peft-ia3-bert", "bert", IA3Config(task_type=TaskType.SEQ_CLS), 2),
        # the paper's k, v and FFN intermediate, plus query and intermediate.dense output-scaled (regexes)
        ("peft-ia3-roberta", "roberta", IA3Config(
            task_type=TaskType.SEQ_CLS,
            target_modules=r".*layer\.\d+\.(attention\.self\.(query|key|value)|intermediate\.dense|output\.dense)",
            feedforward_modules=r".*layer\.\d+\.output\.dense"), 3),
    ]


def make_peft_case(case, arch, config, backbone: Path, labels: int, seed: int):
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=labels)
    model = get_peft_model(base, config)
    perturb(model, lambda n: "lora_" in n or "ia3_l" in n or "prompt_encoder" in n or "modules_to_save" in n, seed)
    folder = HERE / "cases" / case
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(str(folder))
    ids, mask = inputs(arch)
    model.eval()
    with torch.no_grad():
        direct = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(seed + 1)  # a different random classifier: the saved one must replace it
    base = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=labels)
    loaded = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        return direct, loaded(input_ids=ids, attention_mask=mask).logits


# ---------------------------------------------------------------- embedding cases (no classifier)
def embedding_cases():
    from adapters import CompacterPlusPlusConfig, LoRAConfig, PrefixTuningConfig, SeqBnConfig, UniPELTConfig
    from peft import LoraConfig, TaskType
    from peft import PrefixTuningConfig as PeftPrefix
    small_prefix = dict(prefix_length=8, bottleneck_size=64)
    return [
        # case, library, backbone, config, config name, safetensors?, AdapterHub head saved with it (None: no head;
        # "init": the bare model made adaptable with adapters.init, whose keys lack the "roberta." prefix)
        ("ah-seqbn-nohead-bert", "adapterhub", "bert", SeqBnConfig(reduction_factor=8),
         "SeqBnConfig, no head (as SPECTER2 ships its adapters)", True, None),
        ("ah-unipelt-nohead-roberta", "adapterhub", "roberta", UniPELTConfig(PrefixTuningConfig(**small_prefix)),
         "UniPELTConfig, no head", False, None),
        ("ah-compacterpp-tagging-roberta", "adapterhub", "roberta", CompacterPlusPlusConfig(reduction_factor=8),
         "CompacterPlusPlusConfig with a tagging head (not a classifier)", True, "tagging"),
        ("peft-lora-fe-bert", "peft", "bert", LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=4, lora_alpha=8,
                                                          target_modules=["query", "value", "attention.output.dense"]),
         "LoraConfig (FEATURE_EXTRACTION)", True, None),
        ("ah-lora-init-xlmr", "adapterhub", "xlmr", LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"]),
         "LoRAConfig on adapters.init(XLMRobertaModel)", True, "init"),
        # peft prefix tuning of a feature extractor runs on RoBERTa too (the classifier's forward is what fails)
        ("peft-prefix-fe-roberta", "peft", "roberta", PeftPrefix(task_type=TaskType.FEATURE_EXTRACTION,
                                                                  num_virtual_tokens=5, prefix_projection=True,
                                                                  encoder_hidden_size=32),
         "PrefixTuningConfig (FEATURE_EXTRACTION, MLP)", True, None),
        ("peft-prefix-fe-bert", "peft", "bert", PeftPrefix(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=4),
         "PrefixTuningConfig (FEATURE_EXTRACTION)", True, None),
    ]


def pooled(h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The last hidden state pooled as sentence-transformers' Pooling (and Normalize) pool it."""
    m = mask.unsqueeze(-1).to(h.dtype)
    mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return {"embeddings_mean": mean, "embeddings_cls": h[:, 0], "embeddings_max": h.masked_fill(m == 0, -1e9).amax(1),
            "embeddings_mean_normalized": torch.nn.functional.normalize(mean, p=2, dim=1)}


def _ah_hidden(model, ids, mask) -> torch.Tensor:
    """The AdapterHub model's last hidden state: its output without a head, the last hidden state with one."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-1] if getattr(out, "hidden_states", None) is not None else out.last_hidden_state


def _ah_bare(backbone: Path, head):
    """A flex-head model without heads (AutoAdapterModel), or the bare Hugging Face model after adapters.init."""
    import adapters
    from adapters import AutoAdapterModel
    from transformers import AutoModel
    if head != "init":
        return AutoAdapterModel.from_pretrained(backbone)
    model = AutoModel.from_pretrained(backbone)
    adapters.init(model)
    return model


def make_adapterhub_embedding(case, arch, config, backbone: Path, safetensors: bool, head, seed: int):
    torch.manual_seed(seed)
    name = case.replace("-", "_")
    model = _ah_bare(backbone, head)
    model.add_adapter(name, config=config)
    if head == "tagging":
        model.add_tagging_head(name, num_labels=3)
    model.train_adapter(name)
    model.set_active_adapters(name)
    perturb(model, lambda n: f".{name}." in n or n.startswith(f"heads.{name}."), seed)
    folder = HERE / "cases" / case
    shutil.rmtree(folder, ignore_errors=True)
    model.save_adapter(str(folder), name, with_head=head == "tagging", use_safetensors=safetensors)
    ids, mask = inputs(arch)
    with torch.no_grad():
        direct = _ah_hidden(model.eval(), ids, mask)
    model = _ah_bare(backbone, head)
    loaded = model.load_adapter(str(folder), set_active=True, use_safetensors=safetensors)
    model.set_active_adapters(loaded)
    with torch.no_grad():
        return direct, _ah_hidden(model.eval(), ids, mask)


def make_peft_embedding(case, arch, config, backbone: Path, seed: int):
    from peft import PeftModel, get_peft_model
    from transformers import AutoModel
    torch.manual_seed(seed)
    model = get_peft_model(AutoModel.from_pretrained(backbone), config)
    perturb(model, lambda n: "lora_" in n or "prompt_encoder" in n, seed)
    folder = HERE / "cases" / case
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(str(folder))
    ids, mask = inputs(arch)
    with torch.no_grad():
        direct = model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(backbone), str(folder)).eval()
    with torch.no_grad():
        return direct, loaded(input_ids=ids, attention_mask=mask).last_hidden_state


def plain_hidden(backbone: Path, arch: str) -> torch.Tensor:
    from transformers import AutoModel
    ids, mask = inputs(arch)
    with torch.no_grad():
        return AutoModel.from_pretrained(backbone).eval()(input_ids=ids, attention_mask=mask).last_hidden_state


def make_embeddings(backbones: dict, manifest: dict) -> None:
    for seed, (case, lib, arch, config, cls, st, head) in enumerate(embedding_cases(), start=80):
        if lib == "adapterhub":
            direct, hidden = make_adapterhub_embedding(case, arch, config, backbones[arch], st, head, seed)
        else:
            direct, hidden = make_peft_embedding(case, arch, config, backbones[arch], seed)
        diff = (hidden - direct).abs().max().item()
        if diff > 1e-5:
            raise SystemExit(f"{case}: reloaded hidden states differ from the saved model's by {diff:.2e}")
        if (hidden - plain_hidden(backbones[arch], arch)).abs().max().item() < 1e-2:
            raise SystemExit(f"{case}: the adapter does not change the backbone's output (not active?)")
        save_expected(case, arch, pooled(hidden, inputs(arch)[1]))
        weights = ("adapter.safetensors" if st else "pytorch_adapter.bin") if lib == "adapterhub" else \
            "adapter_model.safetensors"
        manifest["cases"][case] = {"library": lib, "backbone": arch, "config": cls,
                                   "head": "tagging" if head == "tagging" else "none", "task": "embedding",
                                   "weights": weights}
        print(f"{case}: {sorted(p.name for p in (HERE / 'cases' / case).iterdir())}, reload diff {diff:.1e}")


# ---------------------------------------------------------------- main
def save_expected(case: str, arch: str, outputs: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    ids, mask = inputs(arch)
    (HERE / "expected").mkdir(exist_ok=True)
    save_file({"input_ids": ids, "attention_mask": mask, **{k: v.contiguous() for k, v in outputs.items()}},
              str(HERE / "expected" / f"{case}.safetensors"))


def only(prefix: str) -> int:
    """Make the peft cases named `prefix`... with the backbones already here; update manifest.json."""
    import peft
    torch.set_num_threads(2)
    manifest = json.loads((HERE / "manifest.json").read_text())
    if manifest["_versions"]["peft"] != peft.__version__:
        raise SystemExit(f"the other cases were made with peft {manifest['_versions']['peft']}, this is {peft.__version__}")
    for seed, (case, arch, config, labels) in enumerate(peft_cases(), start=50):
        if not case.startswith(prefix):
            continue
        direct, logits = make_peft_case(case, arch, config, HERE / "backbones" / arch, labels, seed)
        diff = (logits - direct).abs().max().item()
        if diff > 1e-5:
            raise SystemExit(f"{case}: reloaded logits differ from the saved model's by {diff:.2e}")
        save_expected(case, arch, {"logits": logits})
        manifest["cases"][case] = {"library": "peft", "backbone": arch, "config": type(config).__name__,
                                   "head": "static", "weights": "adapter_model.safetensors"}
        print(f"{case}: reload diff {diff:.1e}, {sorted(p.name for p in (HERE / 'cases' / case).iterdir())}")
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--only"]:
        return only(sys.argv[2])
    import adapters
    import peft
    import transformers
    torch.set_num_threads(2)
    backbones = make_backbones()
    shutil.rmtree(HERE / "cases", ignore_errors=True)
    shutil.rmtree(HERE / "expected", ignore_errors=True)
    (HERE / "cases").mkdir()
    manifest = {"_versions": {"adapters": adapters.__version__, "peft": peft.__version__,
                              "transformers": transformers.__version__, "torch": torch.__version__},
                "cases": {}}
    for seed, (case, arch, config, cls, st, head, labels) in enumerate(adapterhub_cases()):
        folder, name, direct = make_adapterhub_case(case, arch, config, backbones[arch], st, head, labels, seed)
        legacy_edits(case, folder, name)
        logits = reload_adapterhub(folder, backbones[arch], arch, head, labels)
        legacy = case in ("ah-lora-pre110-bert",)  # the loader changes alpha: the logits must change
        diff = (logits - direct).abs().max().item()
        if (diff > 1e-5) != legacy:
            raise SystemExit(f"{case}: reloaded logits differ from the saved model's by {diff:.2e}")
        save_expected(case, arch, {"logits": logits})
        manifest["cases"][case] = {"library": "adapterhub", "backbone": arch, "config": cls, "head": head,
                                   "weights": "adapter.safetensors" if st else "pytorch_adapter.bin"}
        print(f"{case}: {sorted(p.name for p in folder.iterdir())}, reload diff {diff:.1e}")
    for seed, (case, arch, config, labels) in enumerate(peft_cases(), start=50):
        direct, logits = make_peft_case(case, arch, config, backbones[arch], labels, seed)
        diff = (logits - direct).abs().max().item()
        if diff > 1e-5:
            raise SystemExit(f"{case}: reloaded logits differ from the saved model's by {diff:.2e}")
        save_expected(case, arch, {"logits": logits})
        manifest["cases"][case] = {"library": "peft", "backbone": arch, "config": type(config).__name__,
                                   "head": "static", "weights": "adapter_model.safetensors"}
        print(f"{case}: reload diff {diff:.1e}")
    make_embeddings(backbones, manifest)
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
