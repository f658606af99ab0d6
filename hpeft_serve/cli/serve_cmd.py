"""`hpeft serve --repo model_repository [--http-port 8000 --grpc-port 8001 --metrics-port 8002
--gateway-port 8080]`: start the real tritonserver, wait until the model is ready, start the REST gateway
beside it (admin token from HPEFT_ADMIN_TOKEN), stop both cleanly on Ctrl-C."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--gateway-port", type=int, default=8080, help="REST gateway port (0: no gateway)")
    p.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0 to accept remote clients)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the model to be ready")


def run(args) -> int:
    from ..errors import HpeftError
    from ..serving.triton import TritonServer
    server = TritonServer(args.repo, args.http_port, args.grpc_port, args.metrics_port, address=args.address)
    server.start(args.timeout)
    print(f"serving model hpeft: REST http://{args.address}:{args.http_port}/v2/models/hpeft/infer, "
          f"gRPC {args.address}:{args.grpc_port}, metrics :{args.metrics_port}; log {server.log}; Ctrl-C stops",
          flush=True)
    try:
        gateway = _gateway(args)
    except BaseException:
        server.stop()
        raise
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    restarts: list[float] = []
    try:
        while not done.wait(1.0):
            if server.proc.poll() is None:
                continue
            code = server.proc.returncode
            restarts = [t for t in restarts if time.monotonic() - t < 300] + [time.monotonic()]
            if len(restarts) > 3:
                print(f"tritonserver exited ({code}) a fourth time in 5 minutes: giving up; log {server.log}")
                return 1
            print(f"tritonserver exited ({code}); restarting it (the gateway answers 503 meanwhile); "
                  f"log {server.log}.1", flush=True)
            try:
                server.start(args.timeout)
            except HpeftError as e:
                print(f"error: the restart failed: {e}")
                return 1
            print("tritonserver is back", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()
    print("stopped")
    return 0


def _gateway(args):
    """The gateway beside this server, when the repository has a shared-backbone export."""
    import re
    if not args.gateway_port:
        return None
    if not (args.repo / "hpeft" / "1" / "export" / "backbone.json").is_file():
        print("no shared-backbone export in the repository (hpeft deploy): the gateway is not started", flush=True)
        return None
    from ..gateway import GatewayThread, Settings
    cfg = (args.repo / "hpeft" / "config.pbtxt").read_text()
    store = re.search(r'key: "ADAPTER_STORE" value \{ string_value: "([^"]*)" \}', cfg)
    settings = Settings.from_env(repo=str(args.repo), triton=f"{args.address}:{args.grpc_port}",
                                 triton_metrics=f"http://{args.address}:{args.metrics_port}/metrics",
                                 store=store.group(1) if store and store.group(1) else None)
    g = GatewayThread(settings, args.address, args.gateway_port).start()
    print(f"gateway: http://{args.address}:{args.gateway_port}/v1/predict (docs /docs); adapter writes "
          f"{'need the admin token' if settings.admin_token else 'disabled (HPEFT_ADMIN_TOKEN unset)'}", flush=True)
    return g
