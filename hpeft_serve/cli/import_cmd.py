"""`hpeft import {adapterhub,peft} SRC --backbone B --out DIR`: another library's checkpoint -> hpeft checkpoint."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("library", choices=("adapterhub", "peft"), help="the library that saved SRC")
    p.add_argument("src", type=Path, help="the folder it saved (AdapterHub save_adapter, peft save_pretrained)")
    p.add_argument("--backbone", required=True, help="the backbone it was trained on: a local Hugging Face folder "
                   "(or minilm, tiny-bert, tiny-roberta)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--name", default=None, help="adapter name (default: the --out folder's name)")


def run(args) -> int:
    from ..importers import import_checkpoint
    out = import_checkpoint(args.library, args.src, args.backbone, args.out, args.name)
    print(f"imported {args.library} checkpoint {args.src} -> {out}")
    return 0
