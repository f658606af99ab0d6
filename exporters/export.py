"""`hpeft export`: a checkpoint folder -> artefacts that run without PyTorch (ONNX) or without hpeft
(TorchScript), plus export_config.json (inputs, outputs, labels, files, mode)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from hpeft_serve import checkpoint
from hpeft_serve.errors import HpeftError

from .merge import merge


def export_checkpoint(ckpt: Path, out: Path, fmt: str = "onnx", merged: bool = False, log=print) -> dict:
    model, cfg = checkpoint.load(ckpt)
    if not merged:
        raise HpeftError("the shared-backbone export (without --merge) is not implemented yet; "
                         "use --merge for a standalone model per adapter")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = cfg["name"]
    t0 = time.perf_counter()
    inference = merge(model)
    files = []
    if fmt == "onnx":
        from .onnx_export import export_onnx
        files.append(export_onnx(inference, out / f"{name}.onnx").name)
    elif fmt == "torchscript":
        from .torchscript import export_program, export_torchscript
        files.append(export_torchscript(inference, out / f"{name}.pt").name)
        pt2 = export_program(inference, out / f"{name}.pt2")
        if pt2 is not None:
            files.append(pt2.name)
    else:
        raise HpeftError(f"unknown format {fmt!r}: use onnx or torchscript")
    info = {"name": name, "format": fmt, "mode": "merged", "files": files, "method": cfg["method"],
            "labels": cfg["labels"], "backbone": cfg["backbone"], "inputs": ["input_ids", "attention_mask"],
            "outputs": ["logits"], "seconds": round(time.perf_counter() - t0, 2)}
    (out / "export_config.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"exported {name} ({cfg['method']}, {fmt}, merged) in {info['seconds']}s: "
        + ", ".join(f"{f} ({(out / f).stat().st_size / 1e6:.1f} MB)" for f in files))
    return info
