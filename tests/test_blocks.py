"""Exact identities of the building blocks: LoRA merge, zero-initialised adapters, PHM without forming W,
gates over real tokens (ours) or all positions (AdapterHub), one global pruning threshold, and padding
invariance of every method (a text gives the same logits alone or in a padded batch)."""

from __future__ import annotations

import math

import pytest
import torch

from hpeft_serve.methods import functional as Fn
from hpeft_serve.methods.bottleneck import DenseProj
from hpeft_serve.methods.lora import LoRA
from hpeft_serve.methods.presets import method_names, resolve
from hpeft_serve.methods.sparse import prune
from hpeft_serve.model import HeadConfig
from hpeft_serve.training import build_model

from .conftest import padded_batch


def test_lora_merge_equals_the_unmerged_forward():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    lora = LoRA(16, 24, r=4, alpha=8)
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 5, 16)
    tok = torch.ones(3, 5, 1)
    unmerged = base(x) + lora(x, tok)
    merged = torch.nn.functional.linear(x, lora.merged_weight(base.weight), base.bias)
    assert (unmerged - merged).abs().max() <= 1e-5
    assert torch.allclose(lora.merged_weight(base.weight) - base.weight, 2.0 * lora.lora_B @ lora.lora_A)
    gated = LoRA(16, 24, r=4, alpha=8, gate=True)
    with pytest.raises(ValueError, match="gate"):
        gated.merged_weight(base.weight)


@pytest.mark.parametrize("method", ["lora", "parallel_adapter", "bitfit"])
def test_zero_initialised_adapters_change_nothing(method, tiny_bert, tokenizer):
    model = build_model(tiny_bert, resolve(method, 2), HeadConfig(2)).eval()
    ids, mask = padded_batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(model.encoder(ids, mask, model.adapters), model.encoder(ids, mask))


def test_phm_contracts_factors_exactly_as_the_kronecker_sum():
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out, r = 4, 32, 12, 2
    rule = torch.randn(n, n, n, generator=g, dtype=torch.float64)
    wl = torch.randn(n, d_in // n, r, generator=g, dtype=torch.float64)
    wr = torch.randn(n, r, d_out // n, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    x = torch.randn(3, 7, d_in, generator=g, dtype=torch.float64)
    H = sum(torch.kron(rule[i], wl[i] @ wr[i]) for i in range(n))  # (in, out), AdapterHub's orientation
    assert torch.allclose(Fn.phm_weight(rule, wl, wr), H)
    assert (Fn.phm_linear(x, rule, wl, wr, b) - (x @ H + b)).abs().max() < 1e-10
    # per-row weights (the shared-backbone layout) equal each row run alone
    rules, wls, wrs = rule.expand(3, 1, n, n, n), torch.stack([wl, 2 * wl, -wl])[:, None], wr.expand(3, 1, n, r, d_out // n)
    rows = Fn.phm_linear(x, rules, wls, wrs, b)
    for i in range(3):
        assert (rows[i] - Fn.phm_linear(x[i], rule, wls[i, 0], wr, b)).abs().max() < 1e-10


def test_gate_pooling_masked_ignores_padding_all_does_not():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 8, generator=g)
    w, b = torch.randn(1, 8, generator=g), torch.zeros(1)
    padded = torch.cat([x, torch.randn(1, 3, 8, generator=g)], dim=1)
    mask = torch.tensor([[1.0] * 5 + [0.0] * 3]).unsqueeze(-1)
    assert torch.allclose(Fn.gate(padded, w, b, mask), Fn.gate(x, w, b, torch.ones(1, 5, 1)))
    assert not torch.allclose(Fn.gate(padded, w, b, None), Fn.gate(x, w, b, None))  # AdapterHub's quirk


def test_pruning_uses_one_global_threshold():
    torch.manual_seed(0)
    projs = [DenseProj(16, 4, sparse=True), DenseProj(4, 16, sparse=True)]
    for p, s in zip(projs, (1.0, 0.1)):  # different scales: a per-matrix threshold would prune both alike
        torch.nn.init.normal_(p.weight, std=s)
    prune(projs, "mag", 0.4)
    kept = torch.cat([p.weight[p.sparse_mask].abs() for p in projs])
    pruned = torch.cat([(p.weight.detach() + 0)[~p.sparse_mask] for p in projs])
    assert pruned.abs().max() == 0
    assert kept.min() > 0 and (~projs[1].sparse_mask).float().mean() > (~projs[0].sparse_mask).float().mean()
    assert sum((~p.sparse_mask).sum().item() for p in projs) == math.ceil(0.4 * 128)  # as the official code: k = ceil(s N) pruned


@pytest.mark.parametrize("method", method_names())
def test_logits_do_not_depend_on_batch_padding(method, tiny_bert, tokenizer):
    model = build_model(tiny_bert, resolve(method, 2), HeadConfig(3)).eval()
    with torch.no_grad():  # make every zero-initialised part non-zero
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    texts = ("a good film", "the plot was awful and the actors were very dull indeed", "fine")
    ids, mask = padded_batch(tokenizer, texts)
    with torch.no_grad():
        batched = model(ids, mask)
        for i, t in enumerate(texts):
            alone = tokenizer([t], return_tensors="pt")
            single = model(alone["input_ids"], alone["attention_mask"])
            assert (single - batched[i]).abs().max() <= 1e-5
