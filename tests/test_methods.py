"""One harness over a table of (method, tiny backbone, settings): a new method adds a row, not test code.

For every row: the trainable-parameter count equals the paper's formula; a training step changes only
adapter and head parameters; save/load gives identical logits; prefix ejection is exact; sparse masks
survive training; the loss falls on a small learnable task.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hpeft_serve import checkpoint
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.training import TrainConfig, build_model, collate, encode, train

from .conftest import keyword_task, padded_batch

# trainable adapter parameters as a function of hidden d, FFN width f, layers L (training form)
def _bn(d, w):  # dense bottleneck adapter: down (w, d) + bias, up (d, w) + bias
    return 2 * d * w + w + d


def _phm(d, w, n=4):  # PHM down (n, d/n, 1) (n, 1, w/n) + b(w); up (n, w/n, 1) (n, 1, d/n) + b(d)
    return (d + w + w) + (w + d + d)


def _prefix_mlp(d, length, hid, layers):
    return length * d + (d * hid + hid) + (hid * layers * 2 * d + layers * 2 * d)


def _gate(d):
    return d + 1


EXPECTED = {
    "lora": lambda d, f, L: L * 2 * 8 * (d + d),
    "prefix": lambda d, f, L: _prefix_mlp(d, 30, 512, L),
    "adapter": lambda d, f, L: L * _bn(d, d // 16),
    "parallel_adapter": lambda d, f, L: L * _bn(d, d // 2),
    "bitfit": lambda d, f, L: L * (7 * d + f),
    "sparse_adapter": lambda d, f, L: L * _bn(d, d // 16),
    "sparse_adapter_large": lambda d, f, L: L * _bn(d, d // 4),
    "mam": lambda d, f, L: _prefix_mlp(d, 30, 800, L) + L * _bn(d, d // 2),
    "unipelt": lambda d, f, L: _prefix_mlp(d, 10, 512, L) + L * (_gate(d) + _bn(d, d // 16) + _gate(d)
                                                                 + 2 * (2 * 8 * d + _gate(d))),
    "compacter": lambda d, f, L: 64 + 2 * L * _phm(d, d // 32),
    "compacter_pp": lambda d, f, L: 64 + L * _phm(d, d // 32),
    # 2 layers: spindle groups [], [0], [1], [] -> G2=(A,P) on layer 0, G3=(A,P,B) on layer 1
    "s4": lambda d, f, L: 2 * _bn(d, d // 32) + _prefix_mlp(d, 10, 512, 2) + (7 * d + f),
}

CASES = [(m, "tiny_bert") for m in EXPECTED] + [(m, "tiny_roberta") for m in ("mam", "unipelt", "compacter", "s4")]
IDS = [f"{m}-{b}" for m, b in CASES]


def _model(backbone, method, seed=0, **overrides):
    mc = resolve(method, backbone.config.num_hidden_layers, overrides)
    return build_model(backbone, mc, HeadConfig(2), seed)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(*batch)


def _step(model, tokenizer, task, steps=1, lr=1e-2):
    seqs = encode(tokenizer, [t for t, _ in task.train], 32)
    labels = torch.tensor([y for _, y in task.train])
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    model.train()
    for s in range(steps):
        k = (s * 16) % len(seqs)
        ids, mask = collate(seqs[k:k + 16], tokenizer.pad_token_id)
        loss = F.cross_entropy(model(ids, mask), labels[k:k + 16])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("method,bb", CASES, ids=IDS)
def test_trainable_parameters_as_expected(method, bb, request):
    backbone = request.getfixturevalue(bb)
    model = _model(backbone, method)
    c = backbone.config
    n_adapter = sum(p.numel() for p in model.adapters.parameters() if p.requires_grad)
    assert n_adapter == EXPECTED[method](c.hidden_size, c.intermediate_size, c.num_hidden_layers)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in list(model.adapters.parameters()) + list(model.head.parameters())}
    assert not any(p.requires_grad for p in model.encoder.parameters())


@pytest.mark.parametrize("method,bb", CASES, ids=IDS)
def test_training_step_changes_only_adapter_and_head(method, bb, request, tokenizer, task):
    backbone = request.getfixturevalue(bb)
    model = _model(backbone, method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, tokenizer, task)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "a training step changed nothing"
    assert all(k.startswith(("adapters.", "head.")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("adapters.") for k in changed), "the adapter did not train"


@pytest.mark.parametrize("method,bb", CASES, ids=IDS)
def test_save_load_round_trip_identical_logits(method, bb, request, tokenizer, task, tmp_path):
    backbone = request.getfixturevalue(bb)
    model = _model(backbone, method)
    _step(model, tokenizer, task, steps=2)
    batch = padded_batch(tokenizer)
    checkpoint.save(model, backbone, tmp_path / "ck", ("neg", "pos"), {})
    ref = _logits(model, batch)  # after save (which ejects the prefix)
    loaded, cfg = checkpoint.load(tmp_path / "ck")
    assert cfg["method"] == method and cfg["labels"] == ["neg", "pos"]
    assert torch.equal(_logits(loaded, batch), ref)


@pytest.mark.parametrize("method", ["prefix", "mam", "unipelt", "s4"])
def test_prefix_ejection_is_exact(method, tiny_bert, tokenizer, task):
    model = _model(tiny_bert, method)
    _step(model, tokenizer, task, steps=2)
    batch = padded_batch(tokenizer)
    before = _logits(model, batch)
    n_before = sum(p.numel() for p in model.adapters.parameters())
    model.adapters.eject_prefix()
    assert model.adapters.prefix.ejected
    assert sum(p.numel() for p in model.adapters.parameters()) < n_before
    assert torch.equal(_logits(model, batch), before)


@pytest.mark.parametrize("method,pruner", [("sparse_adapter", "snip"), ("sparse_adapter", "grasp"),
                                           ("sparse_adapter", "mag"), ("sparse_adapter", "rand"),
                                           ("sparse_adapter_large", "snip")])
def test_sparse_mask_survives_training(method, pruner, tiny_bert, tokenizer, task):
    model = _model(tiny_bert, method, pruner=pruner)
    cfg = TrainConfig(epochs=2, batch_size=16, max_length=32)
    train(model, tokenizer, task, cfg, progress=False, evaluate_after=False)
    projs = model.adapters.sparse_projections()
    sparsity = model.adapters.sparse_settings()[1]
    total = sum(p.weight.numel() for p in projs)
    zeros = sum((p.weight == 0).sum().item() for p in projs)
    masked = sum((~p.sparse_mask).sum().item() for p in projs)
    assert masked == int(torch.tensor(sparsity * total).ceil())  # one global threshold over all weights
    assert zeros >= masked
    for p in projs:
        assert torch.all(p.weight[~p.sparse_mask] == 0), "a pruned weight moved during training"
        assert torch.any(p.weight[p.sparse_mask] != 0)
    biases = [p.bias for p in projs]
    assert all((b != 0).any() for b in biases[1::2]), "biases are not pruned"


def test_large_sparse_has_the_non_zeros_of_the_sparse_adapter(tiny_bert, tokenizer, task):
    def nnz(method):
        model = _model(tiny_bert, method)
        train(model, tokenizer, task, TrainConfig(max_length=32), progress=False, evaluate_after=False)
        return sum(p.sparse_mask.sum().item() for p in model.adapters.sparse_projections())
    small, large = nnz("sparse_adapter"), nnz("sparse_adapter_large")
    assert abs(large - small) / small < 0.05


@pytest.mark.parametrize("method,bb", CASES, ids=IDS)
def test_loss_falls_on_a_small_task(method, bb, request, tokenizer):
    backbone = request.getfixturevalue(bb)
    model = _model(backbone, method)
    data = keyword_task(n_train=160, seed=1)
    res = train(model, tokenizer, data, TrainConfig(epochs=3, batch_size=16, max_length=32, lr=5e-3, head_lr=5e-3),
                progress=False, evaluate_after=False)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < first - 0.05, f"loss {first:.3f} -> {last:.3f}"


def test_training_is_deterministic_under_a_seed(tiny_bert, tokenizer, task):
    def run(seed):
        model = _model(tiny_bert, "unipelt", seed=seed)
        res = train(model, tokenizer, task, TrainConfig(seed=seed, max_length=32), progress=False,
                    evaluate_after=False)
        return res.losses, _logits(model, padded_batch(tokenizer))
    (l1, o1), (l2, o2), (l3, _) = run(0), run(0), run(1)
    assert l1 == l2 and torch.equal(o1, o2)
    assert l1 != l3


def test_components_follow_the_papers():
    mam = resolve("mam", 12)
    prefix, par = mam.components
    assert (prefix.length, prefix.bottleneck) == (30, 800)
    assert (par.mode, par.site, par.scaling, par.width(768)) == ("parallel", "ffn", 4.0, 384)
    uni = resolve("unipelt", 12)
    assert all(c.gate for c in uni.components)
    lora = [c for c in uni.components if c.type == "lora"][0]
    assert lora.targets == ("q", "v") and lora.r == 8
    assert [c.site for c in resolve("compacter", 12).components] == ["attn", "ffn"]
    assert [c.site for c in resolve("compacter_pp", 12).components] == ["ffn"]
    sp = resolve("sparse_adapter", 12).components[0]
    assert sp.sparsity == 0.4 and sp.pruner == "snip"
    s4 = resolve("s4", 12)
    assert s4.extra["layer_groups"] == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9], [10, 11]]
    lora_layers = [c.layers for c in s4.components if c.type == "lora"][0]
    assert lora_layers == (0, 1, 10, 11)  # G1 and G4
    bitfit_layers = [c.layers for c in s4.components if c.type == "bitfit"][0]
    assert bitfit_layers == tuple(range(6, 12))  # G3 and G4


def test_overrides_apply_and_bad_settings_are_named():
    from hpeft_serve.errors import ConfigError
    mc = resolve("lora", 2, {"r": 4, "targets": ["q", "k", "v", "o", "ffn_in", "ffn_out"]})
    assert mc.components[0].r == 4 and len(mc.components[0].targets) == 6
    with pytest.raises(ConfigError, match="unknown method 'lorax'"):
        resolve("lorax", 2)
    with pytest.raises(ConfigError, match=r"targets \['x'\]"):
        resolve("lora", 2, {"targets": ["x"]})
    with pytest.raises(ConfigError, match="do not apply"):
        resolve("lora", 2, {"sparsity": 0.5})
    with pytest.raises(ConfigError, match="pruner 'erk'"):
        resolve("sparse_adapter", 2, {"pruner": "erk"})
    with pytest.raises(ConfigError, match="s4 strategy 'x'"):
        resolve("s4", 2, s4_groups=[["x"], [], [], []])


def test_lora_targets_all_projections(tiny_bert, tokenizer, task):
    model = _model(tiny_bert, "lora", targets=["q", "k", "v", "o", "ffn_in", "ffn_out"])
    _step(model, tokenizer, task)
    for la in model.adapters.layers:
        assert set(la.lora) == {"q", "k", "v", "o", "ffn_in", "ffn_out"}
        assert all(m.lora_B.abs().sum() > 0 for m in la.lora.values())


def test_config_dataclasses_round_trip():
    for m in EXPECTED:
        mc = resolve(m, 6)
        from hpeft_serve.methods.config import MethodConfig
        back = MethodConfig.from_dict(mc.to_dict())
        assert [dataclasses.asdict(c) for c in back.components] == [dataclasses.asdict(c) for c in mc.components]
