"""`hpeft deploy EXPORT_DIR --repo model_repository [--url HOST:PORT]`."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("export_dir", type=Path, help="a shared-backbone export (hpeft export CKPT --out DIR), or a "
                   "merged one (--merge): each merged adapter becomes its own Triton model")
    p.add_argument("--repo", type=Path, default=Path("model_repository"), help="the Triton model repository")
    p.add_argument("--url", default=None, help="a running server's gRPC HOST:PORT: reload the model if the graph "
                   "changed (new adapters need nothing: they load on first use). Model control needs Triton's "
                   "key: HPEFT_TRITON_KEY, else, for a server on this host started by hpeft, the key file it "
                   "wrote for that port (~/.cache/hpeft/triton-keys/port-PORT.key, or under $XDG_RUNTIME_DIR)")


def run(args) -> int:
    from ..errors import HpeftError
    from ..serving.deploy import MODEL, deploy
    result = deploy(args.export_dir, args.repo)
    to_load = result.get("merged", []) + ([MODEL] if result["graph_changed"] else [])
    if args.url and to_load:
        import tritonclient.grpc as grpcclient  # model control over gRPC: over HTTP it stalls HTTP inference
        from tritonclient.utils import InferenceServerException

        from ..serving.client import triton_key_headers
        from ..serving.triton import find_key
        key = find_key(args.url)
        for model in to_load:
            try:
                grpcclient.InferenceServerClient(args.url).load_model(model, headers=triton_key_headers(key))
            except InferenceServerException as e:
                hint = "" if key or "restricted" not in str(e) else (
                    " (no key for it: set HPEFT_TRITON_KEY to the server's key)")
                raise HpeftError(f"could not (re)load model {model!r} at {args.url}: {e}{hint}") from None
            print(f"(re)loaded {model} at {args.url}")
    return 0
