"""`hpeft serve --repo model_repository [--http-port 8000 --grpc-port 8001 --metrics-port 8002
--gateway-port 8080 --address 127.0.0.1]`: start the real tritonserver (its ports on loopback only, its
model control behind a key), wait until the model is ready, start the REST gateway beside it (the public
face, on --address; admin token from HPEFT_ADMIN_TOKEN), restart tritonserver whenever it dies (with
back-off, never giving up), stop both cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

STABLE_S = 60.0  # up this long after a restart: the next death starts the back-off from its first delay again


def add_arguments(p) -> None:
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--http-port", type=int, default=8000, help="Triton KServe v2 REST port (loopback only)")
    p.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port (loopback only)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Triton metrics port (loopback only)")
    p.add_argument("--gateway-port", type=int, default=8080, help="REST gateway port (0: no gateway)")
    p.add_argument("--address", default="127.0.0.1",
                   help="the gateway's listen address (0.0.0.0 to accept remote clients). Triton's own ports "
                   "always listen on 127.0.0.1: a crafted KServe request can crash tritonserver 2.51 or its "
                   "stub (over HTTP and gRPC), so only the gateway, which screens its input, is public")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the model to be ready")
    p.add_argument("--max-restart-delay", type=float, default=30.0,
                   help="a dead tritonserver is restarted after 1 s, then 2, 4, ... up to this many seconds "
                   f"while it keeps dying (back to 1 s once it has run {STABLE_S:.0f} s)")
    p.epilog = ("Model control and the other state-changing Triton APIs need the key header: the key is "
                "HPEFT_TRITON_KEY, or a random one written (0600) to ~/.cache/hpeft/triton-keys/port-PORT.key "
                "($XDG_RUNTIME_DIR/hpeft/... when set), where `hpeft deploy --url` on this host finds it. "
                "Neither the key nor HPEFT_ADMIN_TOKEN is in tritonserver's environment.")


def run(args) -> int:
    from ..serving.triton import LOOPBACK, TritonServer, check_ports_free
    ports = {"Triton HTTP, --http-port": args.http_port, "Triton gRPC, --grpc-port": args.grpc_port,
             "Triton metrics, --metrics-port": args.metrics_port}
    check_ports_free(ports)
    if args.gateway_port:
        check_ports_free({"gateway, --gateway-port": args.gateway_port}, args.address)
    server = TritonServer(args.repo, args.http_port, args.grpc_port, args.metrics_port)
    server.start(args.timeout)
    print(f"serving model hpeft on loopback: REST http://{LOOPBACK}:{args.http_port}/v2/models/hpeft/infer, "
          f"gRPC {LOOPBACK}:{args.grpc_port}, metrics :{args.metrics_port}; log {server.log}; Ctrl-C stops",
          flush=True)
    try:
        gateway = _gateway(args, server.key)
    except BaseException:
        server.stop()
        raise
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        _watch(server, args, done)
    except KeyboardInterrupt:
        pass
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()
    print("stopped")
    return 0


def _watch(server, args, done: threading.Event) -> None:
    """Until `done`: keep the regions private, and restart tritonserver each time it dies, waiting
    1, 2, 4, ... up to --max-restart-delay seconds between tries while it keeps dying; never give up (an
    outside request may crash it again and again; the gateway answers 503 meanwhile)."""
    from ..errors import HpeftError
    delay, up_since = 1.0, time.monotonic()
    while not done.wait(1.0):
        if server.proc.poll() is None:
            server.secure_regions()
            continue
        if time.monotonic() - up_since >= STABLE_S:
            delay = 1.0
        print(f"tritonserver exited ({server.proc.returncode}); restarting it in {delay:g}s (the gateway "
              f"answers 503 meanwhile); log {server.log}.1", flush=True)
        while not done.wait(delay):
            delay = min(2 * delay, args.max_restart_delay)
            try:
                server.start(args.timeout)
            except HpeftError as e:
                print(f"the restart failed ({e}); trying again in {delay:g}s", flush=True)
                continue
            up_since = time.monotonic()
            print("tritonserver is back", flush=True)
            break


def _gateway(args, triton_key: str):
    """The gateway beside this server, when the repository has a shared-backbone export."""
    import re
    if not args.gateway_port:
        return None
    if not (args.repo / "hpeft" / "1" / "export" / "backbone.json").is_file():
        print("no shared-backbone export in the repository (hpeft deploy): the gateway is not started", flush=True)
        return None
    from ..gateway import GatewayThread, Settings
    from ..serving.triton import LOOPBACK
    cfg = (args.repo / "hpeft" / "config.pbtxt").read_text()
    store = re.search(r'key: "ADAPTER_STORE" value \{ string_value: "([^"]*)" \}', cfg)
    settings = Settings.from_env(repo=str(args.repo), triton=f"{LOOPBACK}:{args.grpc_port}",
                                 triton_metrics=f"http://{LOOPBACK}:{args.metrics_port}/metrics",
                                 store=store.group(1) if store and store.group(1) else None, triton_key=triton_key)
    g = GatewayThread(settings, args.address, args.gateway_port).start()
    print(f"gateway (the public face): http://{args.address}:{args.gateway_port}/v1/predict, /v1/embeddings "
          f"(OpenAI-compatible), /v1/models (docs /docs); adapter writes "
          f"{'need the admin token' if settings.admin_token else 'disabled (HPEFT_ADMIN_TOKEN unset)'}",
          flush=True)
    return g
