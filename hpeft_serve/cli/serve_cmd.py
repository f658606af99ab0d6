"""`hpeft serve --repo model_repository [--http-port 8000 --grpc-port 8001 --metrics-port 8002]`:
start the real tritonserver, wait until the model is ready, stop cleanly on Ctrl-C."""

from __future__ import annotations

import signal
import threading
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0 to accept remote clients)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the model to be ready")


def run(args) -> int:
    from ..serving.triton import TritonServer
    server = TritonServer(args.repo, args.http_port, args.grpc_port, args.metrics_port, address=args.address)
    server.start(args.timeout)
    print(f"serving model hpeft: REST http://{args.address}:{args.http_port}/v2/models/hpeft/infer, "
          f"gRPC {args.address}:{args.grpc_port}, metrics :{args.metrics_port}; log {server.log}; Ctrl-C stops",
          flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(1.0):
            if server.proc.poll() is not None:
                print(f"tritonserver exited ({server.proc.returncode}); log {server.log}")
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    print("stopped")
    return 0
