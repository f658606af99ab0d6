"""Shared fixtures: tiny seeded backbones (no network), their tokenizer, and a small learnable task."""

from __future__ import annotations

import random

import pytest
import torch

from hpeft_serve.backbone import load_backbone
from hpeft_serve.data import Dataset

POS = ["good", "great", "fine", "superb", "lovely", "wonderful", "excellent", "nice"]
NEG = ["bad", "awful", "poor", "terrible", "dull", "boring", "weak", "horrible"]
FILL = ["the", "movie", "was", "a", "plot", "really", "actors", "film", "story", "and", "quite", "very"]


def keyword_task(n_train: int = 96, n_test: int = 32, seed: int = 0) -> Dataset:
    """A small task a tiny random encoder can learn: the label is which sentiment word the text holds."""
    rng = random.Random(seed)

    def example():
        y = rng.randrange(2)
        words = [rng.choice(FILL) for _ in range(rng.randint(2, 12))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if y else NEG))
        return " ".join(words), y

    return Dataset("keywords", ("neg", "pos"), [example() for _ in range(n_train)], [example() for _ in range(n_test)])


@pytest.fixture(scope="session")
def tiny_bert():
    return load_backbone("tiny-bert")


@pytest.fixture(scope="session")
def tiny_roberta():
    return load_backbone("tiny-roberta")


@pytest.fixture(scope="session")
def tokenizer(tiny_bert):
    return tiny_bert.tokenizer()


@pytest.fixture(scope="session")
def task():
    return keyword_task()


def padded_batch(tokenizer, texts=("a good film", "the plot was awful and the actors were very dull indeed",
                                   "fine", "a really lovely story")):
    """A padded batch of mixed lengths: (input_ids, attention_mask)."""
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    assert enc["attention_mask"].min() == 0  # really padded
    return enc["input_ids"], enc["attention_mask"]


def mixed_lengths(b: int, s: int, seed: int, step: int = 2):
    """Random token ids (b, s) and a mask whose row r (r >= 1) has its last tokens padded, `step` more a row
    (at least 2 real tokens): a padded batch of mixed lengths without a tokenizer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for r in range(1, b):
        mask[r, max(2, s - step * r):] = 0
    return ids, mask


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
