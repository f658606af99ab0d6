"""`hpeft gateway --repo REPO --triton HOST:PORT [--store URL] [--port 8080]`: the REST gateway alone
(/v1/predict, the OpenAI-compatible /v1/embeddings and /v1/models, adapters), in front of a Triton that runs
elsewhere (a container, a Kubernetes Service). `hpeft serve` starts it
beside its own tritonserver. Flags left out fall back to the HPEFT_* environment variables; the key of
Triton's model control (the reload after a dead stub) is HPEFT_TRITON_KEY, else the key file of a
tritonserver on this host (never a flag: flags are visible to every local user)."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--repo", help="model repository, a folder or an fsspec URL (env HPEFT_REPO; default model_repository)")
    p.add_argument("--triton", help="Triton gRPC HOST:PORT (env HPEFT_TRITON_GRPC; default localhost:8001)")
    p.add_argument("--triton-metrics", help="Triton metrics URL (env HPEFT_TRITON_METRICS; default Triton's host :8002)")
    p.add_argument("--store", help="adapter store, a folder or fsspec URL (env HPEFT_ADAPTER_STORE; "
                   "default REPO/hpeft/1/export/packs)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0 to accept remote clients)")


def run(args) -> int:
    import uvicorn

    from ..gateway import Settings, create_app
    from ..serving.triton import find_key
    settings = Settings.from_env(repo=args.repo, triton=args.triton, triton_metrics=args.triton_metrics,
                                 store=args.store)
    app = create_app(settings)
    key = "HPEFT_TRITON_KEY" if settings.triton_key else \
        "its key file" if find_key(settings.triton) else "none (HPEFT_TRITON_KEY unset: a dead stub is not reloaded)"
    print(f"gateway on http://{args.address}:{args.port} (/v1/predict, OpenAI-compatible /v1/embeddings for "
          f"adapters and the backbone {app.state.gateway.model_id!r}; docs /docs) -> Triton {settings.triton}; "
          f"adapter store {app.state.gateway.store.location}; writes "
          f"{'need the admin token' if settings.admin_token else 'disabled (HPEFT_ADMIN_TOKEN unset)'}; "
          f"Triton key: {key}; body limits {settings.upload_limit / 2 ** 20:.1f} MiB (uploads), "
          f"{settings.json_limit / 2 ** 20:.1f} MiB (other routes)", flush=True)
    uvicorn.run(app, host=args.address, port=args.port, log_level="warning")
    return 0
