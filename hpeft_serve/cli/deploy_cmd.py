"""`hpeft deploy EXPORT_DIR --repo model_repository [--url HOST:PORT]`."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("export_dir", type=Path, help="a shared-backbone export (hpeft export CKPT --out DIR)")
    p.add_argument("--repo", type=Path, default=Path("model_repository"), help="the Triton model repository")
    p.add_argument("--url", default=None, help="a running server's gRPC HOST:PORT: reload the model if the graph "
                   "changed (new adapters need nothing: they load on first use)")


def run(args) -> int:
    from ..errors import HpeftError
    from ..serving.deploy import MODEL, deploy
    result = deploy(args.export_dir, args.repo)
    if args.url and result["graph_changed"]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException
        try:
            grpcclient.InferenceServerClient(args.url).load_model(MODEL)
        except InferenceServerException as e:
            raise HpeftError(f"could not reload model {MODEL!r} at {args.url}: {e}") from None
        print(f"reloaded {MODEL} at {args.url}")
    return 0
