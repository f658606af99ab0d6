"""Bring your own checkpoint: adapters trained with AdapterHub `adapters` or Hugging Face `peft`, imported
exactly into a normal hpeft checkpoint (export, deploy and serve it like any other), or refused with a
message naming what is not modelled. Adapters saved without a classifier import as embedding adapters.
Weights are read from safetensors, or from a torch .bin by a loader that runs no code (torch_bin.py).
"""

from __future__ import annotations

from pathlib import Path

from ..backbone import load_backbone
from ..errors import CheckpointError, HpeftError

LIBRARIES = ("adapterhub", "peft")


def import_checkpoint(library: str, src: Path, backbone: str, out: Path, name: str | None = None,
                      pooling: str | None = None, normalize: bool | None = None, log=print) -> Path:
    """Import the checkpoint folder `src` of `library` for `backbone` into the hpeft checkpoint `out`: a
    classifier, or (saved without one) an embedding adapter pooled by `pooling` (mean, cls, max) and
    `normalize`, by default the backbone's. `log` gets the import's notes (what it ignored or chose)."""
    from . import adapterhub, common, peft
    if library not in LIBRARIES:
        raise HpeftError(f"unknown library {library!r}: use one of {', '.join(LIBRARIES)}")
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder: give the folder the library saved (save_adapter / "
                              "save_pretrained)")
    bb = load_backbone(backbone)
    read = adapterhub.import_adapterhub if library == "adapterhub" else peft.import_peft
    imp = common.embedding_head(read(src, bb), bb, pooling, normalize, str(src))
    path = common.save(imp, bb, Path(out), name)
    for note in imp.notes:
        log(f"note: {note}")
    return path
