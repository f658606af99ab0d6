"""Adapter names become file names (packs, exported models, store entries): letters, digits, '.', '_', '-'."""

from __future__ import annotations

import re

from .errors import CheckpointError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise CheckpointError(f"adapter name {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    return name
