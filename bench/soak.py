"""Soak: concurrent clients through the REST gateway for about a minute, across several adapters of
different methods, while one adapter is replaced through the gateway every second. Loopback only,
bounded in time; `hpeft serve` (the real tritonserver + the gateway) is started and stopped here.

Every answer must be 200 and equal (fp32, 1e-5) the PyTorch forward of the adapter version it names
(the model answers the version of the weights that computed each row). Prints a table, writes
bench/results/soak.md and .json; exits 1 on any failed request or mismatch.

    python bench/soak.py [--seconds 60] [--clients 4] [--backbone minilm]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from export import make_ckpt  # noqa: E402

from exporters.export import export_checkpoint  # noqa: E402
from hpeft_serve import checkpoint  # noqa: E402
from hpeft_serve.backbone import load_backbone  # noqa: E402
from hpeft_serve.serving.client import free_ports  # noqa: E402
from hpeft_serve.serving.deploy import deploy  # noqa: E402

ADAPTERS = {"uni": "unipelt", "lora": "lora", "cpp": "compacter_pp", "sparse": "sparse_adapter"}
TEXTS = [["a wonderful, moving film", "dull"],
         ["the plot was thin but the actors carried it with charm and wit", "I walked out after twenty minutes"]]
TOL = 1e-5
TOKEN = "soak-token"


def call(url: str, body: bytes, method: str = "POST", headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, body, method=method, headers=headers or {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode()[:300]}
    except OSError as e:
        return 0, {"error": str(e)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--swap-every", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/soak"))
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="hpeft-soak-"))
    backbone = load_backbone(args.backbone)
    tok = backbone.tokenizer()

    print(f"[soak] {len(ADAPTERS)} adapters x 2 versions on {args.backbone}: checkpoints, packs, references", flush=True)
    refs: dict[tuple[str, str], list[np.ndarray]] = {}  # (adapter, version) -> logits per text batch
    packs: dict[str, list[tuple[str, bytes]]] = {}  # adapter -> [(version, pack bytes)] for the swapper
    for i, (name, method) in enumerate(ADAPTERS.items()):
        packs[name] = []
        for v in range(2):
            ck = make_ckpt(backbone, method, work / f"ck{v}", 10 * i + v, name)
            out = work / ("export" if v == 0 else f"v{v}-{name}")
            export_checkpoint(ck, out, "onnx", log=lambda *_: None)
            raw = (out / "packs" / f"{name}.safetensors").read_bytes()
            version = hashlib.sha256(raw).hexdigest()[:16]
            packs[name].append((version, raw))
            model, _ = checkpoint.load(ck)
            with torch.no_grad():
                refs[(name, version)] = [
                    model(**{k: torch.as_tensor(t) for k, t in tok(texts, padding=True, truncation=True, max_length=512,
                                                                  return_tensors="np").items()
                             if k in ("input_ids", "attention_mask")}).numpy() for texts in TEXTS]
    repo = work / "repo"
    deploy(work / "export", repo, log=lambda *_: None)

    http, grpc, metrics, gport = free_ports(4)
    env = dict(os.environ, HPEFT_ADMIN_TOKEN=TOKEN, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    hpeft = Path(sys.executable).with_name("hpeft")
    serve = subprocess.Popen([str(hpeft), "serve", "--repo", str(repo), "--http-port", str(http), "--grpc-port",
                              str(grpc), "--metrics-port", str(metrics), "--gateway-port", str(gport)],
                             env=env, stdout=open(work / "serve.log", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    gw = f"http://127.0.0.1:{gport}"
    try:
        t0 = time.monotonic()
        while call(f"{gw}/healthz", None, "GET")[0] != 200:
            if serve.poll() is not None or time.monotonic() - t0 > 180:
                print((work / "serve.log").read_text()[-2000:])
                raise SystemExit("hpeft serve did not come up")
            time.sleep(0.5)
        for name in ADAPTERS:  # warm: every adapter resident once
            call(f"{gw}/v1/predict", json.dumps({"adapter": name, "inputs": TEXTS[0]}).encode())
        print(f"[soak] serving on {gw}; {args.clients} clients for {args.seconds:.0f}s, a replacement every "
              f"{args.swap_every:g}s", flush=True)
        res = run(gw, refs, packs, args)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
    return report(res, args)


def run(gw: str, refs: dict, packs: dict, args) -> dict:
    stop = time.monotonic() + args.seconds
    lock = threading.Lock()
    res = {"requests": 0, "failed": [], "mismatch": [], "latency_ms": [], "swaps": 0, "swap_ms": [],
           "versions_seen": {}, "max_diff": 0.0}

    def client(k: int) -> None:
        rng = random.Random(k)
        while time.monotonic() < stop:
            name, b = rng.choice(list(ADAPTERS)), rng.randrange(len(TEXTS))
            t = time.perf_counter()
            code, out = call(f"{gw}/v1/predict", json.dumps({"adapter": name, "inputs": TEXTS[b]}).encode())
            ms = 1000 * (time.perf_counter() - t)
            with lock:
                res["requests"] += 1
                res["latency_ms"].append(ms)
                if code != 200:
                    res["failed"].append((name, code, out.get("error", "")[:200]))
                    continue
                ref = refs.get((name, out["version"]))
                res["versions_seen"].setdefault(name, set()).add(out["version"])
                if ref is None:
                    res["mismatch"].append((name, out["version"], "unknown version"))
                    continue
                got = np.array([o["logits"] for o in out["outputs"]], np.float32)
                diff = float(np.abs(got - ref[b]).max())
                res["max_diff"] = max(res["max_diff"], diff)
                if diff > TOL:
                    res["mismatch"].append((name, out["version"], diff))

    def swapper() -> None:
        i = 0
        while time.monotonic() < stop - args.swap_every:
            time.sleep(args.swap_every)
            name = list(ADAPTERS)[i % len(ADAPTERS)]
            version, raw = packs[name][(i // len(ADAPTERS) + 1) % 2]
            t = time.perf_counter()
            code, out = call(f"{gw}/v1/adapters/{name}", raw, "PUT",
                             {"authorization": f"Bearer {TOKEN}", "content-type": "application/octet-stream"})
            with lock:
                res["swaps"] += 1
                res["swap_ms"].append(1000 * (time.perf_counter() - t))
                if code != 201 or out.get("version") != version:
                    res["failed"].append((name, code, f"swap: {out}"))
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    threads.append(threading.Thread(target=swapper))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res["seconds"] = time.monotonic() - t0
    return res


def report(res: dict, args) -> int:
    lat = res["latency_ms"]
    versions = {n: len(v) for n, v in res["versions_seen"].items()}
    lines = [f"Soak (bench/soak.py): {args.backbone}, {len(ADAPTERS)} adapters ({', '.join(ADAPTERS.values())}), "
             f"{args.clients} clients through the gateway, one adapter replaced every {args.swap_every:g}s; "
             "hpeft serve (tritonserver + gateway) on this machine (2 cores shared with the clients)", "",
             "| measure | value |", "|---|---|",
             f"| duration | {res['seconds']:.1f} s |",
             f"| requests (2 texts each) | {res['requests']} ({res['requests'] / res['seconds']:.1f}/s) |",
             f"| failed requests | {len(res['failed'])} |",
             f"| answers not equal to their version's PyTorch logits (> {TOL:g}) | {len(res['mismatch'])} |",
             f"| max abs diff, answer vs its version's reference | {res['max_diff']:.1e} |",
             f"| replacements (PUT /v1/adapters/NAME) | {res['swaps']}, p50 {statistics.median(res['swap_ms'] or [0]):.0f} ms |",
             f"| versions answered per adapter | {versions} |",
             f"| latency p50 / p99 | {np.percentile(lat, 50):.1f} / {np.percentile(lat, 99):.1f} ms |"]
    text = "\n".join(lines)
    print("\n" + text)
    for f in res["failed"][:5] + res["mismatch"][:5]:
        print("  ", f)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {k: (v if k != "versions_seen" else {n: sorted(s) for n, s in v.items()}) for k, v in res.items()
         if k not in ("latency_ms", "swap_ms")} | {"latency_p50_ms": float(np.percentile(lat, 50)),
                                                  "latency_p99_ms": float(np.percentile(lat, 99))}, indent=1, default=str))
    ok = not res["failed"] and not res["mismatch"] and res["requests"] > 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
