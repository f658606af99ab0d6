"""The `hpeft` command line. One module per command, imported only when that command runs."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": "train an adapter on a task and save a checkpoint",
    "import": "import an AdapterHub or Hugging Face peft checkpoint (exactly, or refused)",
    "export": "export a checkpoint to ONNX or TorchScript",
    "deploy": "put a shared-backbone export into the Triton model repository",
    "serve": "start tritonserver and the REST gateway on the model repository (Ctrl-C stops both)",
    "gateway": "run the REST gateway alone, in front of a Triton that runs elsewhere",
    "predict": "tokenize texts and call an adapter on the server over gRPC",
    "search": "S4: try layer-group strategy assignments on a small budget and report a table",
    "env": "print the versions of the libraries that matter",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (for its arguments): `hpeft --help` imports none."""
    p = argparse.ArgumentParser(prog="hpeft", description="Hybrid PEFT adapters: train, export and serve many "
                                "task adapters on one frozen backbone.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_module=name)
        if name == command:
            importlib.import_module(f"hpeft_serve.cli.{name}_cmd").add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    from ..errors import HpeftError
    try:
        return importlib.import_module(f"hpeft_serve.cli.{args._module}_cmd").run(args) or 0
    except HpeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
