"""Serving through the real tritonserver, MiniLM on CPU (README table): the shared-backbone model `hpeft`
against a merged model (`hpeft export --merge` + `hpeft deploy`, dynamic batching) in the same server, in
the same run, measured in alternating rounds.

- memory (PSS of tritonserver + its stub processes) with 1, 10 and 100 adapters resident (merged: 1 and 10;
  100 merged models would need 100 stub processes of ~200 MB each on this 24 GB machine);
- hot swap: from a new pack written into the store to its first answer;
- throughput with 8 adapters mixed in the batches vs one merged model (4 concurrent gRPC clients; the
  median of 3 alternating rounds);
- latency p50/p99 at batch 1 (gRPC) vs in-process onnxruntime on the same graph, and the merged model,
  measured in alternating rounds so that all see the same machine load;
- the same 100 adapters under a bank budget (BANK_BUDGET_MB, LRU): memory, and the latency of a request
  whose adapter is not resident (loaded from the store on the way).

    python bench/serve.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from exporters.export import export_checkpoint
from hpeft_serve.backbone import load_backbone
from hpeft_serve.serving.client import free_ports, hpeft_inputs
from hpeft_serve.serving.deploy import MERGED_CONFIG, MERGED_PY, deploy
from hpeft_serve.serving.runtime import SharedRuntime
from hpeft_serve.serving.triton import TritonServer

sys.path.insert(0, str(Path(__file__).parent))
from export import make_ckpt  # noqa: E402

def pss_mb(pid: int, skip: str | None = None) -> float:
    """PSS of a process and its children (tritonserver + stubs; not the stubs whose command line holds
    `skip`), MB."""
    total = 0
    kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    pids = [pid] + [p for p in kids if not skip or skip not in Path(f"/proc/{p}/cmdline").read_text()]
    for p in pids:
        for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total / 1024


def request(ids, mask, names=None):
    if names is not None:
        return hpeft_inputs(grpcclient, ids, mask, names)
    inp = [grpcclient.InferInput("input_ids", list(ids.shape), "INT64"),
           grpcclient.InferInput("attention_mask", list(mask.shape), "INT64")]
    inp[0].set_data_from_numpy(ids)
    inp[1].set_data_from_numpy(mask)
    return inp


def latency(client, model, ids, mask, names, n) -> list[float]:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        client.infer(model, request(ids, mask, names))
        ts.append(1000 * (time.perf_counter() - t))
    return ts


def throughput(url, model, ids, mask, names_fn, seconds, clients=4) -> float:
    count, stop = [0], time.monotonic() + seconds
    lock = threading.Lock()

    def run(k):
        c = grpcclient.InferenceServerClient(url)
        i = k
        while time.monotonic() < stop:
            c.infer(model, request(ids, mask, names_fn(i)))
            i += clients
            with lock:
                count[0] += len(ids)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return count[0] / seconds


def pct(xs, q):
    return float(np.percentile(xs, q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--method", default="unipelt", help="the method of the adapters served")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/serve-METHOD.json")
    ap.add_argument("--budget-mb", type=int, default=32, help="bank budget of the LRU run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hpeft-bench-serve-"))
    backbone = load_backbone("minilm")
    ck = make_ckpt(backbone, args.method, work / "ckpt", 0, "a0")
    export_checkpoint(ck, work / "export", "onnx", log=lambda *_: None)
    export_checkpoint(ck, work / "merged", "onnx", merged=True, log=lambda *_: None)
    packs = work / "export" / "packs"
    for i in range(1, 100):  # 99 more adapters (copies of the pack under other names)
        for suffix in (".safetensors", ".json"):
            meta = (packs / f"a0{suffix}").read_bytes()
            (packs / f"a{i}{suffix}").write_bytes(meta.replace(b'"name": "a0"', f'"name": "a{i}"'.encode())
                                                  if suffix == ".json" else meta)
    ids = np.random.default_rng(0).integers(1000, 20000, (1, 32)).astype(np.int64)
    mask = np.ones_like(ids)
    res: dict = {"memory_mb": {}, "hot_swap_ms": [], "throughput": {}, "latency_ms": {}}

    def add_merged(repo: Path, n: int) -> Path:
        """n merged models m0..m{n-1} as `hpeft deploy` writes them (dynamic batching, one stub each)."""
        for i in range(n):
            d = repo / f"m{i}" / "1"
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "merged" / "a0.onnx", d / "model.onnx")
            (d / "model.py").write_text(MERGED_PY)
            (repo / f"m{i}" / "config.pbtxt").write_text(MERGED_CONFIG.format(name=f"m{i}", method=args.method))
        return repo

    def server(repo: Path, ready_model: str) -> TritonServer:
        http, grpc, metrics = free_ports()
        s = TritonServer(repo, http, grpc, metrics, work=work / "triton", ready_model=ready_model)
        s.url_grpc = f"127.0.0.1:{grpc}"
        return s

    repo = work / "repo"
    deploy(work / "export", repo, log=lambda *_: None)
    add_merged(repo, 1)
    with server(repo, "hpeft") as srv:
        time.sleep(3)  # m0 loads after hpeft is ready
        url = srv.url_grpc
        client = grpcclient.InferenceServerClient(url)
        for n in (1, 10, 100):
            for i in range(n):
                client.infer("hpeft", request(ids, mask, [f"a{i}"]))
            res["memory_mb"][f"shared model, {n} adapters resident"] = pss_mb(srv.proc.pid, skip="/m0/1/")
        store = repo / "hpeft" / "1" / "export" / "packs"
        for k in range(10):  # hot swap: a new pack written into the store -> its first answer
            name = f"hot{k}"
            t = time.perf_counter()
            for suffix in (".safetensors", ".json"):
                data = (store / f"a0{suffix}").read_bytes()
                if suffix == ".json":
                    data = data.replace(b'"name": "a0"', f'"name": "{name}"'.encode())
                (store / f".{name}{suffix}.tmp").write_bytes(data)
                (store / f".{name}{suffix}.tmp").rename(store / f"{name}{suffix}")
            client.infer("hpeft", request(ids, mask, [name]))
            res["hot_swap_ms"].append(1000 * (time.perf_counter() - t))
        # shared vs merged in the same server, in alternating rounds, so that both see the same machine
        runs = {}
        for b in (1, 8):
            bi, bm = np.repeat(ids, b, 0), np.repeat(mask, b, 0)
            runs[f"shared, 8 adapters mixed, batch {b}"] = ("hpeft", bi, bm, lambda i, b=b: [f"a{(i + r) % 8}" for r in range(b)])
            runs[f"merged model, batch {b}"] = ("m0", bi, bm, lambda i: None)
        rounds = {k: [] for k in runs}
        for _ in range(3):
            for k, (model, bi, bm, names) in runs.items():
                rounds[k].append(throughput(url, model, bi, bm, names, args.seconds / 3))
        res["throughput"] = {k: statistics.median(v) for k, v in rounds.items()}
        rt = SharedRuntime(work / "export")
        rt.infer(ids, mask, ["a1"])
        served, local, merged = [], [], []
        for _ in range(6):  # alternating rounds: all three see the same load
            served += latency(client, "hpeft", ids, mask, ["a1"], 50)
            merged += latency(client, "m0", ids, mask, None, 50)
            for _ in range(50):
                t = time.perf_counter()
                rt.infer(ids, mask, ["a1"])
                local.append(1000 * (time.perf_counter() - t))
        res["latency_ms"]["shared model via gRPC"] = served
        res["latency_ms"]["shared in-process (SharedRuntime)"] = local
        res["latency_ms"]["merged model via gRPC"] = merged
        del rt
    cfg = repo / "hpeft" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('key: "BANK_BUDGET_MB" value { string_value: "1024" }',
                                           f'key: "BANK_BUDGET_MB" value {{ string_value: "{args.budget_mb}" }}'))
    shutil.rmtree(repo / "m0")
    with server(repo, "hpeft") as srv:
        client = grpcclient.InferenceServerClient(srv.url_grpc)
        cold = []
        for rnd in range(2):
            for i in range(100):  # round robin over 100 adapters: with a budget below 100 packs, every one is a miss
                t = time.perf_counter()
                client.infer("hpeft", request(ids, mask, [f"a{i}"]))
                cold.append(1000 * (time.perf_counter() - t))
        res["memory_mb"][f"shared model, 100 adapters in use, bank budget {args.budget_mb} MB (LRU)"] = pss_mb(srv.proc.pid)
        res["latency_ms"][f"adapter not resident (budget {args.budget_mb} MB, round robin over 100)"] = cold[100:]
    for n in (1, 10):
        with server(add_merged(work / f"repo-merged-{n}", n), "m0") as srv:
            time.sleep(2 * n)  # the other merged models load after m0 is ready
            res["memory_mb"][f"{n} merged model(s), one per adapter"] = pss_mb(srv.proc.pid)
    res["method"], res["pack_mb"] = args.method, (packs / "a0.safetensors").stat().st_size / 1e6
    report(res)
    out = args.out or Path(f"bench/results/serve-{args.method}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    return 0


def report(res) -> None:
    print(f"MiniLM + {res['method']} packs ({res['pack_mb']:.2f} MB each), CPU (2 cores shared by server, stubs "
          "and clients), tritonserver 2.51\n")
    print("| memory (PSS, server + stubs) | MB |\n|---|---|")
    for k, v in res["memory_mb"].items():
        print(f"| {k} | {v:.0f} |")
    h = res["hot_swap_ms"]
    print(f"\nhot swap (pack written -> first answer), 10 swaps: p50 {statistics.median(h):.1f} ms, "
          f"max {max(h):.1f} ms\n")
    print("| throughput (4 gRPC clients) | rows/s |\n|---|---|")
    for k, v in res["throughput"].items():
        print(f"| {k} | {v:.1f} |")
    print("\n| latency, batch 1 x 32 tokens | p50 ms | p99 ms |\n|---|---|---|")
    for k, v in res["latency_ms"].items():
        print(f"| {k} | {pct(v, 50):.2f} | {pct(v, 99):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
