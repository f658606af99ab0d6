"""`hpeft import {adapterhub,peft} SRC --backbone B --out DIR [--pooling P] [--normalize]`: another library's
checkpoint -> hpeft checkpoint (a classifier, or an embedding adapter when it was saved without one)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("library", choices=("adapterhub", "peft"), help="the library that saved SRC")
    p.add_argument("src", type=Path, help="the folder it saved (AdapterHub save_adapter, peft save_pretrained)")
    p.add_argument("--backbone", required=True, help="the backbone it was trained on: a local Hugging Face folder "
                   "(or minilm, tiny-bert, tiny-roberta)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--name", default=None, help="adapter name (default: the --out folder's name)")
    p.add_argument("--pooling", choices=("mean", "cls", "max"), default=None,
                   help="embedding adapters (saved without a classifier: AdapterHub without a head or with one "
                   "that is not a classifier, peft FEATURE_EXTRACTION): how the last hidden state is pooled "
                   "(default: the backbone folder's sentence-transformers config, else mean)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="embedding adapters: L2-normalise the embedding (default: as the backbone folder's "
                   "sentence-transformers modules say, else not)")


def run(args) -> int:
    from ..importers import import_checkpoint
    out = import_checkpoint(args.library, args.src, args.backbone, args.out, args.name, pooling=args.pooling,
                            normalize=args.normalize)
    print(f"imported {args.library} checkpoint {args.src} -> {out}")
    return 0
