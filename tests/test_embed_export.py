"""Embedding adapters through export and the shared runtime: merged ONNX and TorchScript output
`embeddings` equal to the PyTorch forward (HybridModel with an EmbeddingHead; mean, cls and max pooling,
with and without L2 normalisation) within 1e-5 on padded batches of mixed lengths; ONE shared graph serves
embedding adapters alone and mixed with classifiers in one forward (ONNX, TorchScript, SharedRuntime): an
embedding row's logits are float32 min, a classifier row's embeddings its pooled sentence vector, and
"@backbone" the plain encoder pooled as backbone.json says; a graph exported before the embeddings output
keeps serving classifiers, refuses embedding packs and "@backbone" by name, and is re-exported by the next
export into its folder."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exporters.export import export_checkpoint, read_layout, write_shared_graph
from hpeft_serve import checkpoint
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig, pool
from hpeft_serve.pack.layout import NEG, Layout
from hpeft_serve.serving.runtime import SharedRuntime
from hpeft_serve.training import build_model

from .test_export import _bank, _batches, _make_ckpt, _ort

TOL = 1e-5
# name -> (method, pooling, normalize): every pooling, with and without normalisation, several methods
EMBED = {"e_max": ("mam", "max", True), "e_mean": ("unipelt", "mean", False), "e_cls": ("compacter", "cls", True),
         "e_lora": ("lora", "mean", True)}
CLASSIFY = {"c_lora": "lora", "c_sparse": "sparse_adapter"}


def make_embed_ckpt(backbone, method, folder, pooling="mean", normalize=True, seed=0):
    """An embedding adapter's checkpoint (HeadConfig task embedding), every adapter part non-zero."""
    head = HeadConfig(0, pooling, task="embedding", normalize=normalize)
    model = build_model(backbone, resolve(method, backbone.config.num_hidden_layers, {}), head, seed)
    model.adapters.eject_prefix()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return checkpoint.save(model, backbone, folder, (), {})


@functools.lru_cache(maxsize=16)
def _model(ck):
    return checkpoint.load(ck)[0]


def _reference(ck, batch):
    """The PyTorch forward of a checkpoint (its model loaded once)."""
    with torch.no_grad():
        return _model(ck)(*(torch.as_tensor(t) for t in batch)).numpy()


def ck_hidden(ck) -> int:
    return json.loads((ck / "adapter_config.json").read_text())["backbone"]["hidden_size"]


def pooled(ck, ids, mask):
    """A checkpoint's sentence vector as its head pools it (the adapted last hidden state, not normalised)."""
    model = _model(ck)
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
    with torch.no_grad():
        return pool(model.encoder(ids, mask, model.adapters), mask, model.head.cfg.pooling).numpy()


def plain(backbone, ids, mask, pooling, normalize):
    """The plain backbone (no adapter) pooled and maybe normalised: what "@backbone" must give."""
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
    with torch.no_grad():
        x = pool(backbone.build_encoder().eval()(ids, mask), mask, pooling)
        return (F.normalize(x, p=2.0, dim=-1) if normalize else x).numpy()


@pytest.fixture(scope="module")
def cks(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("embed-ck")
    out = {n: make_embed_ckpt(tiny_bert, m, root / n, p, z, seed=i) for i, (n, (m, p, z)) in enumerate(EMBED.items())}
    return out | {n: _make_ckpt(tiny_bert, m, root / n, labels=3, seed=7 + i) for i, (n, m) in enumerate(CLASSIFY.items())}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, cks):
    dirs = {}
    for fmt in ("onnx", "torchscript"):
        d = tmp_path_factory.mktemp(f"embed-{fmt}")
        for ck in cks.values():
            export_checkpoint(ck, d, fmt, log=lambda *_: None)
        dirs[fmt] = d
    return dirs


@pytest.mark.parametrize("name", ["e_max", "e_cls"])  # mean pooling: in the shared tests
def test_merged_exports_output_embeddings_equal_pytorch(name, cks, tmp_path):
    ck = cks[name]
    export_checkpoint(ck, tmp_path / "onnx", "onnx", merged=True, log=lambda *_: None)
    export_checkpoint(ck, tmp_path / "ts", "torchscript", merged=True, log=lambda *_: None)
    info = json.loads((tmp_path / "onnx" / f"{name}.json").read_text())
    assert info["task"] == "embedding" and info["outputs"] == ["embeddings"] and info["labels"] == []
    assert info["pooling"] == EMBED[name][1] and info["normalize"] == EMBED[name][2]
    sess = _ort(tmp_path / "onnx" / f"{name}.onnx")
    assert [o.name for o in sess.get_outputs()] == ["embeddings"]
    ts = torch.jit.load(str(tmp_path / "ts" / f"{name}.pt"))
    for ids, mask in _batches():
        ref = _reference(ck, (ids, mask))
        assert ref.shape == (len(ids), ck_hidden(ck))
        got = sess.run(["embeddings"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert np.abs(got - ref).max() <= TOL
        assert np.abs(ts(ids, mask).numpy() - ref).max() <= TOL
        if EMBED[name][2]:
            assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@functools.lru_cache(maxsize=4)
def _graph(fmt, folder):
    return _ort(folder / "backbone.onnx") if fmt == "onnx" else torch.jit.load(str(folder / "backbone.pt"))


def _run(fmt, folder, ids, mask, idx, bank):
    from exporters.layout import bank_feed
    feed = bank_feed(bank, read_layout(folder))
    if fmt == "onnx":
        base = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "adapter_index": idx.numpy()}
        return _graph(fmt, folder).run(["logits", "embeddings"], base | {n: v.numpy() for n, v in feed.items()})
    return [t.numpy() for t in _graph(fmt, folder)(ids, mask, idx, *feed.values())]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_one_shared_graph_serves_embedding_adapters_alone_and_mixed_with_classifiers(fmt, cks, shared):
    folder = shared[fmt]
    assert read_layout(folder).embeddings
    names = list(cks)
    bank = _bank(folder, names)
    for ids, mask in _batches():
        for k, n in enumerate(EMBED):  # alone
            logits, emb = _run(fmt, folder, ids, mask, torch.full((len(ids),), names.index(n)), bank)
            assert np.abs(emb - _reference(cks[n], (ids, mask))).max() <= TOL
            assert (logits == NEG).all()
    ids, mask = _batches()[1]
    idx = torch.tensor([names.index(n) for n in ("e_max", "c_lora", "e_cls", "c_sparse", "e_mean")])
    logits, emb = _run(fmt, folder, ids, mask, idx, bank)  # mixed: one forward
    for r, k in enumerate(idx.tolist()):
        n, row = names[k], (ids[r:r + 1], mask[r:r + 1])
        if n in EMBED:
            assert np.abs(emb[r] - _reference(cks[n], row)[0]).max() <= TOL and (logits[r] == NEG).all()
        else:
            assert np.abs(logits[r, :3] - _reference(cks[n], row)[0]).max() <= TOL
            assert np.abs(emb[r] - pooled(cks[n], *row)[0]).max() <= TOL


def test_runtime_answers_each_row_its_kind_and_backbone_is_the_plain_encoder(cks, shared, tiny_bert, tmp_path):
    ids, mask = (t.numpy() for t in _batches()[1])
    names = ["e_max", "c_lora", "@backbone", "e_lora", "c_lora"]
    folder = tmp_path / "export"
    shutil.copytree(shared["onnx"], folder)
    for pooling, normalize in (("mean", False), ("cls", True), ("max", True)):  # as backbone.json says
        info = json.loads((folder / "backbone.json").read_text())
        if pooling == "mean":
            assert info["embedding"] == {"pooling": "mean", "normalize": False}  # tiny-bert's embedding_defaults()
        (folder / "backbone.json").write_text(json.dumps(info | {"embedding": {"pooling": pooling, "normalize": normalize}}))
        answers = SharedRuntime(folder, bind_bank=pooling == "max").infer(ids, mask, names)  # bound: the GPU path
        out, errs, versions = answers
        assert not any(errs) and answers.tasks == ["embedding", "classification", "embedding", "embedding",
                                                   "classification"]
        assert versions[2] == tiny_bert.sha256[:16]
        assert np.abs(out[2] - plain(tiny_bert, ids[2:3], mask[2:3], pooling, normalize)[0]).max() <= TOL
        for r, n in enumerate(names):
            row = (ids[r:r + 1], mask[r:r + 1])
            if n == "@backbone":
                continue
            assert np.abs(out[r] - _reference(cks[n], row)[0]).max() <= TOL
            ref_emb = _reference(cks[n], row)[0] if n in EMBED else pooled(cks[n], *row)[0]
            assert np.abs(answers.embeddings[r] - ref_emb).max() <= TOL
            assert out[r].shape == ((tiny_bert.config.hidden_size,) if n in EMBED else (3,))


def test_a_graph_without_the_embeddings_output_stays_valid_and_is_re_exported(cks, tiny_bert, tmp_path):
    folder = tmp_path / "old"
    old = Layout(lora=("q", "v"))  # as a graph of the previous release: no embeddings output
    folder.mkdir()
    write_shared_graph(tiny_bert.build_encoder(), tiny_bert.describe(), old, folder)
    info = json.loads((folder / "backbone.json").read_text())
    del info["embedding"], info["layout"]["embeddings"]  # what that release wrote
    (folder / "backbone.json").write_text(json.dumps(info))
    assert [o.name for o in _ort(folder / "backbone.onnx").get_outputs()] == ["logits"]
    (folder / "packs").mkdir()
    for n in ("c_lora", "e_lora"):  # packs written beside it by hand (bypassing deploy)
        export_checkpoint(cks[n], tmp_path / "new", "onnx", log=lambda *_: None)
        for suffix in (".json", ".safetensors"):
            shutil.copy(tmp_path / "new" / "packs" / f"{n}{suffix}", folder / "packs" / f"{n}{suffix}")
    ids, mask = (t.numpy() for t in _batches()[1])
    answers = SharedRuntime(folder).infer(ids, mask, ["c_lora", "e_lora", "@backbone", "c_lora", "c_lora"])
    out, errs, _ = answers
    assert errs[0] is None and np.abs(out[0] - _reference(cks["c_lora"], (ids[:1], mask[:1]))[0]).max() <= TOL
    assert answers.embeddings[0] is None
    assert "lacks" in errs[1] and "predates" in errs[2]
    logs = []
    export_checkpoint(cks["e_max"], folder, "onnx", log=logs.append)  # the next export re-exports it
    assert any("predates the embeddings output" in x for x in logs) and read_layout(folder).embeddings
    answers = SharedRuntime(folder).infer(ids, mask, ["c_lora", "e_lora", "@backbone", "e_max", "c_lora"])
    assert not any(answers[1])
    for r, n in ((0, "c_lora"), (1, "e_lora"), (3, "e_max")):
        assert np.abs(answers[0][r] - _reference(cks[n], (ids[r:r + 1], mask[r:r + 1]))[0]).max() <= TOL
