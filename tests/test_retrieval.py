"""Embedding adapters: the ranking loss and retrieval metrics by hand, training of every method on query/positive
pairs (only adapter parameters change, deterministic), the backbone baseline, checkpoints, and `hpeft train`."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from safetensors.torch import load_file

from hpeft_serve import checkpoint
from hpeft_serve.cli import main
from hpeft_serve.data import Pair, PairDataset
from hpeft_serve.errors import CheckpointError, DataError
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.retrieval import metrics, mnrl_loss, ranks, summary, validation_carve
from hpeft_serve.retrieval import cos_sim
from hpeft_serve.training import (TrainConfig, backbone_embedder, build_model, collate, encode, evaluate_retrieval,
                                  mine_negatives, predict_logits, train)

from .conftest import keyword_task

TOPICS = ["football", "election", "shares", "film", "phone", "music", "tennis", "budget", "court", "virus"]
WORDS = ["the", "a", "report", "said", "on", "today", "new", "week", "people", "after", "more", "its"]


def pair_task(n_train: int = 16, n_test: int = 8, seed: int = 0, negatives: bool = True) -> PairDataset:
    """Queries are 'news on <topic>'; a positive mentions the topic among filler words, a negative another one."""
    rng = random.Random(seed)

    def text(topic):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        words.insert(rng.randrange(len(words) + 1), topic)
        return " ".join(words)

    def pair(i):
        t = TOPICS[i % len(TOPICS)]
        other = TOPICS[(i + 1) % len(TOPICS)]
        return Pair(f"news on {t} {i}", text(t), text(other) if negatives and i % 2 == 0 else None)

    return PairDataset("pairs", [pair(i) for i in range(n_train)], [pair(n_train + i) for i in range(n_test)])


@pytest.fixture(scope="module")
def tok(tiny_bert):
    return tiny_bert.tokenizer()


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_loss_equals_a_hand_computation():
    q = [[1.0, 0.2, 2.0], [0.5, -1.0, 0.1]]
    p = [[1.0, 1.0, 1.5], [0.9, -0.8, 0.5]]
    n = [[1.2, -0.2, 1.4]]
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    expected = []
    for i, qi in enumerate(q):
        scores = [20 * _cos(qi, c) for c in p + n]
        expected.append(math.log(sum(math.exp(s) for s in scores)) - scores[i])
    got = mnrl_loss(t(q), t(p), t(n))
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-9) and got.item() > 0.1
    no_neg = [math.log(sum(math.exp(20 * _cos(qi, c)) for c in p)) - 20 * _cos(qi, p[i]) for i, qi in enumerate(q)]
    assert mnrl_loss(t(q), t(p)).item() == pytest.approx(sum(no_neg) / 2, rel=1e-9)


def test_symmetric_loss_adds_the_positive_to_query_direction():
    q = [[1.0, 0.2, 2.0], [0.5, -1.0, 0.1], [0.3, 0.3, -0.4]]
    p = [[1.0, 1.0, 1.5], [0.9, -0.8, 0.5], [-0.2, 0.6, -0.1]]
    n = [[1.2, -0.2, 1.4]]
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))
    forward = [lse([20 * _cos(qi, c) for c in p + n]) - 20 * _cos(qi, p[i]) for i, qi in enumerate(q)]
    backward = [lse([20 * _cos(pi, c) for c in q]) - 20 * _cos(pi, q[i]) for i, pi in enumerate(p)]  # no negatives
    want = (sum(forward) / 3 + sum(backward) / 3) / 2
    assert mnrl_loss(t(q), t(p), t(n), symmetric=True).item() == pytest.approx(want, rel=1e-9)
    assert mnrl_loss(t(q), t(p), t(n)).item() == pytest.approx(sum(forward) / 3, rel=1e-9)
    assert abs(want - sum(forward) / 3) > 1e-3  # the two directions differ on these vectors


def test_metrics_on_a_constructed_similarity_matrix():
    sim = torch.zeros(4, 12)
    sim[0] = torch.arange(12.0).flip(0)  # gold 0 is the best: rank 1
    sim[1] = torch.arange(12.0)  # gold 1 has 10 candidates above it: rank 11
    sim[2, 2], sim[2, 5], sim[2, 7] = 0.5, 0.9, 0.8  # rank 3
    sim[3, :] = 0.3  # all tied: candidates before gold 3 win ties (stable order) -> rank 4
    assert ranks(sim, torch.arange(4)).tolist() == [1, 11, 3, 4]
    m = metrics(sim)
    assert m["recall@1"] == pytest.approx(0.25)
    assert m["recall@10"] == pytest.approx(0.75)
    assert m["mrr@10"] == pytest.approx((1 + 0 + 1 / 3 + 1 / 4) / 4)
    assert metrics(sim, torch.tensor([0, 11, 5, 0]))["recall@1"] == pytest.approx(1.0)
    line = summary(m, {"recall@1": 0.1, "recall@10": 0.5, "mrr@10": 0.2})
    assert line == "recall@1: 0.250 (backbone 0.100) recall@10: 0.750 (backbone 0.500) mrr@10: 0.396 (backbone 0.200)"


def _embedder(backbone, name, pooling="mean", normalize=False, seed=0):
    method = resolve(name, backbone.config.num_hidden_layers)
    return build_model(backbone, method, HeadConfig(0, pooling, task="embedding", normalize=normalize), seed)


METHODS = ["lora", "adapter", "compacter_pp", "unipelt", "mam", "sparse_adapter", "compacter", "prefix", "bitfit",
           "parallel_adapter", "s4"]


@pytest.mark.parametrize("name", METHODS)
def test_a_training_step_changes_only_adapter_parameters(tiny_bert, tok, name):
    model = _embedder(tiny_bert, name, "max" if name == "mam" else "mean")
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    adapters = {k: v.clone() for k, v in model.adapters.state_dict().items()}
    res = train(model, tok, pair_task(8, 4), TrainConfig(batch_size=4, max_length=32),
                progress=False)
    assert res.steps == 2 and all(math.isfinite(x) for x in res.losses)
    assert set(res.metrics) == {"recall@1", "recall@10", "mrr@10"} and math.isnan(res.accuracy)
    assert all(torch.equal(v, encoder[k]) for k, v in model.encoder.state_dict().items())
    changed = [k for k, v in model.adapters.state_dict().items() if k in adapters and not torch.equal(v, adapters[k])]
    assert changed, "no adapter parameter moved"
    for p in model.adapters.sparse_projections():  # the mask was computed on the ranking loss and kept
        assert 0 < (~p.sparse_mask).float().mean() < 1 and not p.weight[~p.sparse_mask].any()


def test_training_is_deterministic_under_the_seed(tiny_bert, tok):
    runs = []
    for seed, symmetric in ((3, False), (3, False), (4, False), (3, True)):
        model = _embedder(tiny_bert, "adapter", seed=seed)
        res = train(model, tok, pair_task(8, 4), TrainConfig(batch_size=4, seed=seed, symmetric=symmetric),
                    progress=False, evaluate_after=False)
        runs.append((res.losses, model.adapters.state_dict()))
    assert runs[0][0] == runs[1][0] and runs[0][0] != runs[2][0]
    assert runs[3][0][0] != runs[0][0][0] and all(math.isfinite(x) for x in runs[3][0])  # another loss, same data
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


def test_the_baseline_is_the_plain_backbone_pooled_the_same_way(tiny_bert, tok):
    model = _embedder(tiny_bert, "lora", "cls", normalize=True)  # LoRA's B starts at zero: no change yet
    data = pair_task(4, 6)
    assert evaluate_retrieval(model, tok, data.test) == evaluate_retrieval(backbone_embedder(model), tok, data.test)
    ids, mask = collate(encode(tok, [p.positive for p in data.test], 32), tok.pad_token_id)
    plain = torch.nn.functional.normalize(tiny_bert.build_encoder()(ids, mask)[:, 0], dim=-1)
    assert torch.allclose(backbone_embedder(model)(ids, mask), plain, atol=1e-6)


def test_mined_negatives_are_the_backbones_best_wrong_positive(tiny_bert, tok):
    pairs = pair_task(12, 1).train
    pairs[5] = pairs[5]._replace(positive=pairs[4].positive)  # the same text: a duplicate, never a negative
    embed = backbone_embedder(_embedder(tiny_bert, "lora"))
    mined = mine_negatives(embed, tok, pairs, 32, near_duplicate=0.9999)
    emb = lambda texts: predict_logits(embed, encode(tok, texts, 32), tok.pad_token_id)
    sim = cos_sim(emb([p.query for p in pairs]), emb([p.positive for p in pairs]))
    positives = [p.positive for p in pairs]
    for i, (p, m) in enumerate(zip(pairs, mined)):
        assert m.query == p.query and m.positive == p.positive
        if p.negative is not None:
            assert m.negative == p.negative
            continue
        j = positives.index(m.negative)
        assert j != i and {i, j} != {4, 5}
        assert all(sim[i, j] >= sim[i, k] for k in range(12) if k not in (i, j) and {i, k} != {4, 5})


def test_task_and_head_must_match(tiny_bert, tok):
    with pytest.raises(DataError, match="query/positive pairs"):
        train(_embedder(tiny_bert, "lora"), tok, keyword_task(8, 4), TrainConfig(), progress=False)
    clf = build_model(tiny_bert, resolve("lora", 2), HeadConfig(2))
    with pytest.raises(DataError, match="embedding head"):
        train(clf, tok, pair_task(), TrainConfig(), progress=False)


def test_an_embedding_checkpoint_round_trips(tiny_bert, tok, tmp_path):
    model = _embedder(tiny_bert, "mam", "max", normalize=True)
    train(model, tok, pair_task(8, 4), TrainConfig(batch_size=4), progress=False,
          evaluate_after=False)
    model.eval()
    ids, mask = collate(encode(tok, ["a short one", "a much longer text about the football election"], 32),
                        tok.pad_token_id)
    with torch.no_grad():
        want = model(ids, mask)
    folder = checkpoint.save(model, tiny_bert, tmp_path / "emb", (), {"task": "pairs"})
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["labels"] == [] and cfg["head"] == {"num_labels": 0, "pooling": "max", "dropout": 0.1,
                                                    "task": "embedding", "normalize": True}
    assert not [k for k in load_file(folder / "adapter.safetensors") if k.startswith("head.")]
    loaded, _ = checkpoint.load(folder)
    assert loaded.head.cfg == model.head.cfg
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), want) and want.shape == (2, tiny_bert.config.hidden_size)
    cfg["labels"] = ["x"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no labels"):
        checkpoint.load(folder)


def test_an_old_checkpoint_without_task_loads_as_a_classifier(tiny_bert, tmp_path):
    model = build_model(tiny_bert, resolve("lora", 2), HeadConfig(2))
    folder = checkpoint.save(model, tiny_bert, tmp_path / "old", ("neg", "pos"), {})
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["head"] = {"num_labels": 2, "pooling": "mean", "dropout": 0.1}  # as written before embeddings existed
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    loaded, _ = checkpoint.load(folder)
    assert loaded.head.cfg.task == "classification" and loaded.head.cfg.num_labels == 2
    cfg["labels"] = ["neg"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="1 labels, but its head has 2"):
        checkpoint.load(folder)


def _hpeft(capsys, *args) -> tuple[int, str, str]:
    """`hpeft ARGS` in this process (the CLI's own main; test_cli runs the installed command)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_an_embedding_adapter_from_a_jsonl_file(tmp_path, capsys):
    data = pair_task(24, 8)
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({k: v for k, v in p._asdict().items() if v is not None}) + "\n"
                         for p in data.train + data.test))
    out = tmp_path / "emb"
    code, stdout, err = _hpeft(capsys, "train", "--backbone", "tiny-bert", "--method", "lora", "--task", f, "--out", out,
                               "--quiet",
               "--pooling", "max", "--no-normalize", "--batch-size", "8", "--seed", "1", "--hard-negatives",
               "--symmetric")
    assert code == 0, err
    assert "accuracy" not in stdout
    last = stdout.strip().splitlines()[-1]
    num = r"(\d\.\d{3})"
    m = re.fullmatch(rf"recall@1: {num} \(backbone {num}\) recall@10: {num} \(backbone {num}\) "
                     rf"mrr@10: {num} \(backbone {num}\)", last)
    assert m, last
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["head"]["task"] == "embedding" and cfg["head"]["pooling"] == "max" and not cfg["head"]["normalize"]
    assert cfg["labels"] == [] and cfg["task"] == "pairs" and cfg["train"]["train_size"] == 26
    assert cfg["train"]["hard_negatives"] is True and cfg["train"]["symmetric"] is True
    assert f"{cfg['metrics']['recall@1']:.3f}" == m.group(1)
    assert f"{cfg['metrics']['backbone']['mrr@10']:.3f}" == m.group(6)
    code, _, err = _hpeft(capsys, "train", "--backbone", "tiny-bert", "--method", "lora", "--task", "rotten_tomatoes",
                          "--out", tmp_path / "x", "--normalize")
    assert code == 2 and "embedding (retrieval) tasks only" in err and not (tmp_path / "x").exists()
    code, _, err = _hpeft(capsys, "train", "--backbone", "tiny-bert", "--method", "lora", "--task", "rotten_tomatoes",
                          "--out", tmp_path / "x", "--symmetric")
    assert code == 2 and "--symmetric applies to embedding" in err and not (tmp_path / "x").exists()


def test_the_validation_carve_comes_from_the_training_pool_only(tmp_path, capsys):
    data = pair_task(24, 8)
    carved = validation_carve(data, 6)
    assert carved.train == data.train[:18] and carved.test == data.train[18:]
    assert not set(carved.train + carved.test) & set(data.test)  # the held-out set is not read
    for bad in (0, 24, -1):
        with pytest.raises(DataError, match="validation carve"):
            validation_carve(data, bad)
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({k: v for k, v in p._asdict().items() if v is not None}) + "\n"
                         for p in data.train + data.test))
    out = tmp_path / "emb"
    code, stdout, err = _hpeft(capsys, "train", "--backbone", "tiny-bert", "--method", "lora", "--task", f, "--out", out,
                               "--quiet", "--batch-size", "8", "--val-size", "6", "--lr", "3e-3")
    assert code == 0, err
    assert "20 training / 6 held-out" in stdout, stdout
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["train"]["train_size"] == 20 and cfg["train"]["validation_carve"] == 6 and cfg["train"]["lr"] == 3e-3
    code, _, err = _hpeft(capsys, "train", "--backbone", "tiny-bert", "--method", "lora", "--task", "rotten_tomatoes",
                          "--out", tmp_path / "x", "--val-size", "5")
    assert code == 2 and "--val-size applies to embedding" in err and not (tmp_path / "x").exists()
