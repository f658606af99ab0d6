"""Thousands of adapters through the real tritonserver: MiniLM + LoRA packs, 8, 200 and 2,000 (--sizes)
adapters registered and made resident in one server, mixed traffic (each request 8 rows of mixed lengths
naming 8 distinct adapters drawn from those registered).

Per level: steady p50/p99 latency and rows/s (one gRPC client), the model's stub process RSS (the bank's
memory per adapter, against the packs' own bytes), first-use latency (a 1-row request naming an adapter
registered but never requested), and the growth: the level's new packs are registered (written into the
served store, as an upload does) while steady requests run, and the server's preloader makes them
resident in the background; the same writes into a folder the server does not watch, just after, with the
same traffic for as long as the growth took, are the control (same client-side work, no bank growth, about
as many requests: the longest of more requests is longer by chance alone), so that the difference is what
the growth costs a request. With every adapter resident: the 8-adapter and the N-adapter working sets in alternating rounds
(paired ratio), and the longest latency while packs are replaced in the store (hot swap, each replaced
pack named by the next request). A second server with a bank budget of 10% of the packs: an LRU miss (a
request one of whose adapters is not resident: loaded on the request path, the least recently used
evicted) against a hit, and requests of a resident working set while a second client's requests miss
(load + evict) against while it asks for resident ones (alternating rounds). Answers of a sample of
adapters are checked against the PyTorch forward (fp32, 1e-5).

Packs are made from one exported LoRA: adapter i scales the LoRA B matrices by (1 + i / N) and shifts the
head's output bias by i / N (its reference is the PyTorch model with the same edits).

    python bench/scale.py [--sizes 8,200,2000] [--seconds 8] [--out bench/results/scale]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from safetensors.numpy import load, save

sys.path.insert(0, str(Path(__file__).parent))
from export import make_ckpt  # noqa: E402

from exporters.export import export_checkpoint  # noqa: E402
from hpeft_serve import checkpoint  # noqa: E402
from hpeft_serve.backbone import load_backbone  # noqa: E402
from hpeft_serve.pack.store import PackStore  # noqa: E402
from hpeft_serve.serving.client import free_ports, hpeft_inputs  # noqa: E402
from hpeft_serve.serving.deploy import deploy  # noqa: E402
from hpeft_serve.serving.triton import TritonServer  # noqa: E402

TOL = 1e-5
TEXTS = ["a wonderful, moving film", "dull", "the plot was thin but the actors carried it with charm and wit",
         "I walked out after twenty minutes", "an uneven but often funny comedy about growing up",
         "pretentious", "one of the best films of the year, and the most surprising", "it is what it is"]


# ------------------------------------------------------------------ packs
def variant(tensors: dict, i: int, n: int) -> dict:
    """Adapter i's pack tensors: LoRA B scaled by 1 + i/n, the output bias shifted by i/n."""
    s = 1.0 + i / n
    out = {k: (v * s if k.startswith("lora_") and k.endswith("_B") else v) for k, v in tensors.items()}
    out["head_out_b"] = tensors["head_out_b"] + np.float32(i / n)
    return {k: np.array(v, np.float32) for k, v in out.items()}  # (0-d stays 0-d)


def reference(ck: Path, i: int, n: int, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PyTorch logits of adapter i (the checkpoint's model with the same edits)."""
    model, _ = checkpoint.load(ck)
    with torch.no_grad():
        for la in model.adapters.layers:
            for lo in la.lora.values():
                lo.lora_B.mul_(1.0 + i / n)
        model.head.out_proj.bias.add_(i / n)
        return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).numpy()


def write_packs(store: Path, names: range, base: dict, meta: dict, n_total: int) -> None:
    st = PackStore(store)
    for i in names:
        m = meta | {"name": f"a{i}"}
        m.pop("sha256", None)
        raw = save(variant(base, i, n_total), metadata={"format": "hpeft-pack", "hpeft_pack": json.dumps(m)})
        st.write(f"a{i}", raw, m)


def resident_count(metrics_url: str) -> int:
    """Adapters the server reports resident (its hpeft_adapter_resident gauges at 1)."""
    import urllib.request
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(1 for line in text.splitlines() if line.startswith("hpeft_adapter_resident{")
               and float(line.rsplit(" ", 1)[1]) == 1.0)


def wait_resident(cl: "Client", metrics_url: str, n: int, timeout: float = 600.0) -> float:
    """Seconds until n adapters are resident (the model's publisher thread updates the gauges within 0.5 s of a change)."""
    t = time.monotonic()
    while resident_count(metrics_url) < n:
        if time.monotonic() - t > timeout:
            raise RuntimeError(f"only {resident_count(metrics_url)} of {n} adapters resident after {timeout:.0f} s")
        cl.infer(["a0"], slice(0, 1))
        time.sleep(0.2)
    return time.monotonic() - t


# ------------------------------------------------------------------ measuring
def stub_pid(server_pid: int) -> int:
    """The model's Python-backend stub (the process holding the bank)."""
    kids = [int(p) for p in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()]
    for p in kids:
        if "triton_python_backend_stub" in Path(f"/proc/{p}/cmdline").read_text():
            return p
    raise RuntimeError("no Python-backend stub process under tritonserver")


def stub_rss_mb(server_pid: int) -> float:
    """RSS of the model's Python-backend stub, MB."""
    for line in Path(f"/proc/{stub_pid(server_pid)}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in the stub's status")


def wait_idle(server_pid: int, timeout: float = 300.0, busy: float = 0.05) -> float:
    """Seconds until the stub uses under `busy` of a core over a second (no request is sent meanwhile): its
    watcher has finished hashing the packs that are not resident ahead of their first use."""
    pid, tick, t = stub_pid(server_pid), os.sysconf("SC_CLK_TCK"), time.monotonic()

    def cpu() -> float:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tick  # utime + stime
    while time.monotonic() - t < timeout:
        a = cpu()
        time.sleep(1.0)
        if cpu() - a < busy:
            break
    return time.monotonic() - t


class Client:
    def __init__(self, url: str, tok):
        self.c = grpcclient.InferenceServerClient(url)
        enc = tok(TEXTS, padding=True, return_tensors="np")
        self.ids, self.mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def infer(self, names: list[str], rows: slice | None = None) -> tuple[float, np.ndarray, np.ndarray]:
        ids, mask = (self.ids, self.mask) if rows is None else (self.ids[rows], self.mask[rows])
        ids, mask = ids[:len(names)], mask[:len(names)]
        t = time.perf_counter()
        r = self.c.infer("hpeft", hpeft_inputs(grpcclient, ids, mask, names))
        return 1000 * (time.perf_counter() - t), r.as_numpy("logits"), r.as_numpy("adapter_version")


def steady(cl: Client, pool: list[int], seconds: float, rng, stop: threading.Event | None = None) -> list[float]:
    """Requests of 8 rows naming 8 distinct adapters of `pool`, for `seconds` (or until `stop`)."""
    lat, end = [], time.monotonic() + seconds
    while time.monotonic() < end and not (stop is not None and stop.is_set()):
        lat.append(cl.infer([f"a{i}" for i in rng.choice(pool, 8, replace=False)])[0])
    return lat


def while_running(cl: Client, pool: list[int], job) -> tuple[list[float], object]:
    """Steady traffic over `pool` while `job()` runs in another thread: (latencies, job's result)."""
    box, stop = {}, threading.Event()

    def run():
        box["out"] = job()
        stop.set()
    t = threading.Thread(target=run)
    t.start()
    lat = steady(cl, pool, 1e9, np.random.default_rng(7), stop) if pool else []
    t.join()
    return lat, box["out"]


LOADS: list = []  # (phase, 1-minute load average) during the run


def note_load(phase: str) -> None:
    LOADS.append((phase, float(Path("/proc/loadavg").read_text().split()[0])))


def pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


# ------------------------------------------------------------------ phases
def grow_and_measure(srv, cl: Client, loader: Client, sizes: list[int], seconds: float, packs,
                     preload: bool = True, others: int = 0) -> list[dict]:
    """`packs(lo, hi, folder)` writes packs lo..hi-1 into `folder` (None: the served store). Without the
    server's preloader (`preload` False), each new adapter is made resident by its first request (a 1-row
    request, the loader's), and the control's loader names resident adapters instead. `others`: adapters
    resident beyond a0..a<level> (preloaded at start)."""
    levels, resident = [], sizes[0]
    rng = np.random.default_rng(0)
    for n in sizes:
        grow = control = None
        if n > resident:
            pool = list(range(resident))
            def first_uses(lo, hi, names):
                return [loader.infer([f"a{names(i)}"], slice(i % 8, i % 8 + 1))[0] for i in range(lo, hi)]

            t0 = time.monotonic()

            def register(lo=resident, hi=n):
                packs(lo, hi, None)
                if not preload:
                    first_uses(lo, hi, lambda i: i)
                return wait_resident(loader, srv.url_metrics, hi + others)
            grow, waited = while_running(cl, pool, register)
            grow_s = time.monotonic() - t0

            def write_elsewhere(lo=resident, hi=n, until=time.monotonic() + grow_s):
                # the same pack writes (unwatched) and first requests, then the same traffic for as long as
                # the growth took: the control's longest is over as many requests as the growth's
                with tempfile.TemporaryDirectory(prefix="hpeft-scale-control-") as scratch:
                    packs(lo, hi, Path(scratch))
                if not preload:
                    first_uses(lo, hi, lambda i: i % lo)
                time.sleep(max(0.0, until - time.monotonic()))
            control, _ = while_running(cl, pool, write_elsewhere)
        time.sleep(0.5)
        rss = stub_rss_mb(srv.proc.pid)
        new = list(range(resident, n)) if n > resident else list(range(n))
        first = [loader.infer([f"a{i}"], slice(i % 8, i % 8 + 1))[0] for i in rng.choice(new, min(50, len(new)),
                                                                                         replace=False)]
        hit = [loader.infer([f"a{i}"], slice(i % 8, i % 8 + 1))[0] for i in rng.choice(n, 50)]
        resident = n
        lat = steady(cl, list(range(n)), seconds, rng)
        row = {"adapters": n, "rss_mb": rss, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
               "rows_per_s": 8 * len(lat) / (sum(lat) / 1000), "requests": len(lat),
               "first_use_p50_ms": pct(first, 50), "first_use_max_ms": max(first),
               "resident_1row_p50_ms": pct(hit, 50), "growth_max_ms": max(grow) if grow else None,
               "growth_p99_ms": pct(grow, 99) if grow else None, "growth_requests": len(grow) if grow else 0,
               "control_max_ms": max(control) if control else None,
               "control_p99_ms": pct(control, 99) if control else None,
               "control_requests": len(control) if control else 0,
               "growth_s": grow_s if grow else None}
        levels.append(row)
        print(f"[scale] {n} resident: {json.dumps(row)}", flush=True)
    return levels


def paired(cl: Client, n: int, seconds: float, rounds: int = 4) -> dict:
    """Working sets of 8 and of n adapters (all n resident), alternating rounds."""
    rng = np.random.default_rng(1)
    a, b = [], []
    for _ in range(rounds):
        a += steady(cl, list(range(8)), seconds / rounds, rng)
        b += steady(cl, list(range(n)), seconds / rounds, rng)
    return {"p50_8_ms": pct(a, 50), "p50_n_ms": pct(b, 50), "p99_8_ms": pct(a, 99), "p99_n_ms": pct(b, 99),
            "ratio_p50": pct(b, 50) / pct(a, 50)}


def replacements(cl: Client, store: Path, base: dict, meta: dict, n: int, count: int = 20) -> dict:
    """Packs replaced in the store (a new version each) while requests name them: every request's latency
    and whether the new version answered."""
    rng, lat, swapped = np.random.default_rng(2), [], 0
    st = PackStore(store)
    for k in range(count):
        i = int(rng.integers(n))
        m = meta | {"name": f"a{i}"}
        m.pop("sha256", None)
        raw = save(variant(base, i, n), metadata={"format": "hpeft-pack", "hpeft_pack": json.dumps(m | {"v": k})})
        st.write(f"a{i}", raw, m | {"v": k})
        want = json.loads((store / f"a{i}.json").read_text())["sha256"][:16]
        others = [int(x) for x in rng.choice(n, 7, replace=False) if x != i][:7]
        ms, _, versions = cl.infer([f"a{i}"] + [f"a{j}" for j in others])
        lat.append(ms)
        swapped += versions[0][0].decode() == want
        lat += steady(cl, list(range(n)), 0.2, rng)
    return {"replacements": count, "answered_new_version": swapped, "max_ms": max(lat), "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99)}


def lru(cl: Client, n: int, slots: int, seconds: float) -> dict:
    """Under a budget of `slots` packs: requests of 8 rows whose 8 adapters are all resident (hit) against
    ones with one adapter not resident (miss: loaded from the store, the least recently used evicted)."""
    rng = np.random.default_rng(3)
    recent: list[int] = []  # most recent last: the last slots / 4 asked for are surely resident
    hits, misses = [], []
    for i in range(0, min(slots, n) - 7, 8):
        cl.infer([f"a{j}" for j in range(i, i + 8)])
        recent += list(range(i, i + 8))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        warm = [int(x) for x in rng.choice(recent[-max(slots // 4, 8):], 8, replace=False)]
        hits.append(cl.infer([f"a{j}" for j in warm])[0])
        recent = [j for j in recent if j not in warm] + warm
        cold = int(rng.integers(n))
        while cold in recent[-min(2 * slots, n - 9):]:  # (a small n: fewer excluded, never all)
            cold = int(rng.integers(n))
        misses.append(cl.infer([f"a{cold}"] + [f"a{j}" for j in warm[:7]])[0])
        recent = [j for j in recent if j != cold] + [cold]
    return {"hit_p50_ms": pct(hits, 50), "miss_p50_ms": pct(misses, 50), "ratio": pct(misses, 50) / pct(hits, 50),
            "hit_max_ms": max(hits), "miss_max_ms": max(misses), "requests": len(hits) + len(misses)}


def lru_concurrent(cl: Client, other: Client, n: int, slots: int, seconds: float, rounds: int = 6,
                   seed: int = 5) -> dict:
    """Requests of a resident working set of 8 (cl) while `other` sends 1-row requests in alternating rounds:
    each naming an adapter not resident (a load on the request path and an eviction) or one of the working
    set (the control: the same traffic, no bank change)."""
    warm = [f"a{j}" for j in range(8)]
    cl.infer(warm)
    rng = np.random.default_rng(seed)
    out = {"miss": [], "control": []}
    windows = {"miss": [], "control": []}
    cold_lat = []
    for k in range(rounds):
        kind = "miss" if k % 2 == 0 else "control"
        stop = threading.Event()

        def run(kind=kind, stop=stop):
            while not stop.is_set():
                if kind == "miss":
                    cold_lat.append(other.infer([f"a{int(rng.integers(8, n))}"], slice(0, 1))[0])
                else:
                    other.infer([warm[int(rng.integers(8))]], slice(0, 1))
        t = threading.Thread(target=run)
        t0 = time.time()
        t.start()
        end = time.monotonic() + seconds / rounds
        while time.monotonic() < end:
            out[kind].append(cl.infer(warm)[0])
        stop.set()
        t.join()
        windows[kind].append((t0, time.time()))
    m, c = out["miss"], out["control"]
    return {"miss_round_p50_ms": pct(m, 50), "miss_round_p99_ms": pct(m, 99), "miss_round_max_ms": max(m),
            "control_p50_ms": pct(c, 50), "control_p99_ms": pct(c, 99), "control_max_ms": max(c),
            "requests": len(m) + len(c), "misses": len(cold_lat), "miss_1row_p50_ms": pct(cold_lat, 50),
            "windows": windows}


def first_use(cl: Client, n: int, extra: int) -> dict:
    """1-row requests, one at a time: an adapter registered but never used (loaded from the store on the
    way) against a resident one, alternating."""
    rng = np.random.default_rng(4)
    cold, warm = [], []
    for k in range(extra):
        warm.append(cl.infer([f"a{int(rng.integers(n))}"], slice(k % 8, k % 8 + 1))[0])
        cold.append(cl.infer([f"a{n + k}"], slice(k % 8, k % 8 + 1))[0])
    return {"first_use_p50_ms": pct(cold, 50), "first_use_max_ms": max(cold), "resident_p50_ms": pct(warm, 50),
            "ratio": pct(cold, 50) / pct(warm, 50)}


def in_process(export: Path, store: Path, n: int, budget: int) -> dict:
    """The bank's own work while it grows to n adapters (SharedRuntime in this process, no server): each
    pack's load from the store (read, sha256, checks) and its put (what holds up the request naming it)."""
    from hpeft_serve.serving.runtime import SharedRuntime
    rt = SharedRuntime(export, budget_bytes=budget, store=str(store))
    builds, rebuild = [], rt.bank._rebuild
    rt.bank._rebuild = lambda *a: builds.append(1) or rebuild(*a)
    loads, puts = [], []
    for i in range(n):
        t = time.perf_counter()
        pack = rt.store.load(f"a{i}", whole=False)  # as the runtime reads it (compact: views of the file)
        t1 = time.perf_counter()
        rt.bank.put(pack)
        rt._verified[f"a{i}"] = (pack.stamp, pack.sha256)
        loads.append(1000 * (t1 - t))
        puts.append(1000 * (time.perf_counter() - t1))
    again = []  # a pack read again with its version known (an LRU miss of an evicted adapter): no re-hash
    for i in range(min(n, 200)):
        known = rt._verified.get(f"a{i}")
        t = time.perf_counter()
        rt.store.load(f"a{i}", verified=known, whole=False)
        again.append(1000 * (time.perf_counter() - t))
    out = {"reload_known_p50_ms": pct(again, 50), "reload_known_max_ms": max(again), "put_p50_ms": pct(puts, 50), "put_p99_ms": pct(puts, 99), "put_max_ms": max(puts),
           "put_longest_at": int(np.argmax(puts)), "load_p50_ms": pct(loads, 50),
           "load_max_ms": max(loads), "array_builds": len(builds), "resident_bytes": rt.bank.resident_bytes(),
           "reserved_bytes": rt.bank.nbytes(), "slot_bytes": rt.bank.slot_bytes()}
    del rt
    return out


def exact(cl: Client, ck: Path, n: int) -> float:
    """Max abs diff of served logits against PyTorch, for 8 adapters spread over the n in one request."""
    idx = [int(x) for x in np.linspace(0, n - 1, 8)]
    _, logits, _ = cl.infer([f"a{i}" for i in idx])
    diff = 0.0
    for r, i in enumerate(idx):
        ref = reference(ck, i, n, cl.ids[r:r + 1], cl.mask[r:r + 1])
        diff = max(diff, float(np.abs(logits[r:r + 1, :ref.shape[1]] - ref).max()))
    return diff


TIMED_MODEL = '''"""The hpeft model, each execute's parts timed into EXEC_LOG (bench/scale.py: where a miss's time goes)."""
import json
import time

from hpeft_serve.serving.triton_model import TritonPythonModel as Model

EXEC_LOG = {log!r}


class TritonPythonModel(Model):
    def initialize(self, args):
        super().initialize(args)
        self._log, self._t = open(EXEC_LOG, "a", buffering=1), {{}}
        for name in ("ensure", "_answer"):
            def timed(*a, _f=getattr(self.runtime, name), _n=name, **k):
                t = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    self._t[_n] = self._t.get(_n, 0.0) + 1000 * (time.perf_counter() - t)
            setattr(self.runtime, name, timed)

    def _publish(self):  # on the model's publisher thread, not in an execute: logged on a line of its own
        t = time.perf_counter()
        try:
            super()._publish()
        finally:
            self._log.write(json.dumps({{"at": time.time(), "publisher": 1000 * (time.perf_counter() - t)}}) + "\\n")

    def execute(self, requests):
        self._t, t, g = {{}}, time.perf_counter(), self.runtime.bank.generation
        try:
            return super().execute(requests)
        finally:
            self._log.write(json.dumps({{"at": time.time(), "requests": len(requests), "changed": self.runtime.bank.generation != g,
                                        "total": 1000 * (time.perf_counter() - t), **self._t}}) + "\\n")
'''


def timed_model(repo: Path, log: Path) -> None:
    """The deployed model with each execute's parts timed (ensure: loads; _answer: the forward; publish: the
    residency gauges) into `log`, one JSON line per execute."""
    (repo / "hpeft" / "1" / "model.py").write_text(TIMED_MODEL.format(log=str(log)))


def exec_parts(log: Path, windows: list[tuple[float, float]]) -> dict:
    """Medians / max of the timed parts of the executes inside `windows` (time.time() spans), split by
    whether the execute changed the bank (loaded a pack: a miss)."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if any(a <= r["at"] <= b for a, b in windows) and "publisher" not in r]
    for r in rows:  # what the bank's change adds to every request in (or queued behind) this execute
        r["bank"] = r.get("ensure", 0.0) + r.get("publish", 0.0)  # publish: 0 since gauges left execute
    out = {}
    for kind, sel in (("changed", [r for r in rows if r["changed"]]), ("unchanged", [r for r in rows if not r["changed"]])):
        out[kind] = {"executes": len(sel)} | {
            f"{k}_{q}": (pct([r.get(k, 0.0) for r in sel], 50) if q == "p50" else max([r.get(k, 0.0) for r in sel], default=float("nan")))
            for k in ("total", "ensure", "_answer", "publish", "bank") for q in ("p50", "max")}
    return out


def set_budget(repo: Path, mb: float) -> None:
    cfg = repo / "hpeft" / "config.pbtxt"
    text = cfg.read_text()
    start = text.index('key: "BANK_BUDGET_MB"')
    end = text.index("}", text.index("string_value", start)) + 1
    cfg.write_text(text[:start] + f'key: "BANK_BUDGET_MB" value {{ string_value: "{mb:.1f}" }}' + text[end:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8,200,2000")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/scale"))
    ap.add_argument("--lru-repeats", type=int, default=3, help="runs of the miss-vs-control rounds under the budget")
    ap.add_argument("--preload-ms", type=float, default=None,
                    help="the model's PRELOAD_MS (default: its own, 500; 0: no preloader, first use loads)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    n = sizes[-1]
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="hpeft-scale-"))
    backbone = load_backbone("minilm")
    ck = make_ckpt(backbone, "lora", work / "ck", 0, "a0")
    export_checkpoint(ck, work / "export", "onnx", log=lambda *_: None)
    src = work / "export" / "packs"
    base, meta = load((src / "a0.safetensors").read_bytes()), json.loads((src / "a0.json").read_text())
    repo = work / "repo"
    deploy(work / "export", repo, log=lambda *_: None)
    store = repo / "hpeft" / "1" / "export" / "packs"
    extra = 40  # registered before the server starts, first used one at a time at the end
    print(f"[scale] writing {sizes[0] + extra} packs into {store}", flush=True)
    write_packs(store, list(range(sizes[0])) + list(range(n, n + extra)), base, meta, n)
    pack_file = (store / "a1.safetensors").stat().st_size

    def packs(lo: int, hi: int, folder: Path | None) -> None:
        write_packs(folder or store, range(lo, hi), base, meta, n)
    pack_tensors = sum(v.nbytes for v in base.values())
    res = {"adapters": n, "pack_file_bytes": pack_file, "pack_tensor_bytes": pack_tensors,
           "pack_tensors": sorted(base)}
    slot_mb = 1.02 * pack_tensors / 2 ** 20
    set_budget(repo, 1.5 * n * slot_mb + 64)
    preload = args.preload_ms != 0
    if args.preload_ms is not None:
        cfg = repo / "hpeft" / "config.pbtxt"
        cfg.write_text(cfg.read_text() + f'parameters {{ key: "PRELOAD_MS" value {{ string_value: "{args.preload_ms:g}" }} }}\n')
    res["preload"] = preload
    tok = backbone.tokenizer()

    def server() -> TritonServer:
        http, grpc, metrics = free_ports()
        s = TritonServer(repo, http, grpc, metrics, work=work / "triton")
        s.url_grpc, s.url_metrics = f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics"
        return s

    with server() as srv:
        cl, loader = Client(srv.url_grpc, tok), Client(srv.url_grpc, tok)
        if preload:
            res["startup_preload_s"] = wait_resident(cl, srv.url_metrics, sizes[0] + extra)
        else:  # the first level made resident by requests
            for i in range(0, sizes[0], 8):
                cl.infer([f"a{j}" for j in range(i, min(i + 8, sizes[0]))])
        res["rss_empty_mb"] = stub_rss_mb(srv.proc.pid)  # (with the first level and the extra resident)
        note_load("start")
        res["levels"] = grow_and_measure(srv, cl, loader, sizes, args.seconds, packs, preload,
                                         extra if preload else 0)
        note_load("grown")
        res["paired"] = paired(cl, n, args.seconds)
        res["max_abs_diff"] = exact(cl, ck, n)
        res["replace"] = replacements(cl, store, base, meta, n)
        note_load("replaced")
        res["first_use"] = first_use(cl, n, extra)
        res["preloaded_at_end"] = resident_count(srv.url_metrics)
        print(f"[scale] paired {res['paired']}, replace {res['replace']}, diff {res['max_abs_diff']:.1e}", flush=True)
    write_packs(store, range(n), base, meta, n)  # the replaced packs back, for the reference check
    res["in_process"] = in_process(repo / "hpeft" / "1" / "export", store, n, int(1.5 * n * pack_tensors) + (64 << 20))
    print(f"[scale] in process: {res['in_process']}", flush=True)
    slots = max(n // 10, 24)  # 10% of the packs (at least 3 requests' worth)
    set_budget(repo, slots * pack_tensors / 2 ** 20)
    exec_log = work / "executes.jsonl"
    timed_model(repo, exec_log)
    with server() as srv:
        cl = Client(srv.url_grpc, tok)
        if preload:
            wait_resident(cl, srv.url_metrics, slots - 1)  # the preloader filled the budget (and evicted nothing)
            res["lru_verify_ahead_s"] = wait_idle(srv.proc.pid)  # and hashed the others ahead of their first use
        note_load("lru start")
        res["lru"] = lru(cl, n, slots, args.seconds)
        other = Client(srv.url_grpc, tok)
        res["lru_concurrent"] = [lru_concurrent(cl, other, n, slots, args.seconds, seed=5 + k)
                                 for k in range(args.lru_repeats)]
        res["lru"]["budget_mb"] = slots * pack_tensors / 2 ** 20
        res["lru"]["rss_mb"] = stub_rss_mb(srv.proc.pid)
        res["lru_max_abs_diff"] = exact(cl, ck, n)
        w = [r["windows"] for r in res["lru_concurrent"]]
        res["lru_executes"] = {k: exec_parts(exec_log, [x for r in w for x in r[k]]) for k in ("miss", "control")}
        note_load("lru end")
    res["loadavg"] = LOADS
    return report(res, args.out)


def report(res: dict, out: Path) -> int:
    lv, base = res["levels"], res["levels"][0]
    lines = [f"Scale (bench/scale.py): MiniLM + LoRA packs ({res['pack_file_bytes'] / 1e6:.3f} MB a pack file, "
             f"{res['pack_tensor_bytes'] / 1e6:.3f} MB of tensors), tritonserver on this machine (2 cores shared "
             "with the clients; 1-minute load average " + ", ".join(f"{p} {v:.1f}" for p, v in res.get("loadavg", []))
             + "); requests of 8 rows naming 8 distinct adapters; "
             + ("new packs made resident by the server's preloader" if res.get("preload", True) else
                "**no preloader (PRELOAD_MS 0)**: each new adapter made resident by its first request"), "",
             "| adapters resident | p50 ms | p99 ms | rows/s | p50 vs 8 | stub RSS MB | RSS per adapter vs pack "
             "| first use after registering, p50 / max ms | resident 1 row p50 ms "
             "| while growing: longest / p99 ms (requests) | control: longest / p99 ms (requests) | growth took s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(lv):
        per = (r["rss_mb"] - lv[i - 1]["rss_mb"]) * 2 ** 20 / (r["adapters"] - lv[i - 1]["adapters"]) if i else None
        r["rss_per_adapter_vs_pack"] = per / res["pack_tensor_bytes"] if per else None
        grow = (f"{r['growth_max_ms']:.0f} / {r['growth_p99_ms']:.0f} ({r['growth_requests']})"
                if r["growth_max_ms"] else "-")
        ctl = (f"{r['control_max_ms']:.0f} / {r['control_p99_ms']:.0f} ({r['control_requests']})"
               if r["control_max_ms"] else "-")
        ratio = "-" if per is None else f"{r['rss_per_adapter_vs_pack']:.3f}x"
        took = f"{r['growth_s']:.1f}" if r["growth_s"] else "-"
        lines.append(f"| {r['adapters']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rows_per_s']:.0f} | "
                     f"{r['p50_ms'] / base['p50_ms']:.2f}x | {r['rss_mb']:.0f} | {ratio} | "
                     f"{r['first_use_p50_ms']:.1f} / {r['first_use_max_ms']:.1f} | {r['resident_1row_p50_ms']:.1f} | "
                     f"{grow} | {ctl} | {took} |")
    p, rp, lr, fu, ip = res["paired"], res["replace"], res["lru"], res["first_use"], res["in_process"]
    lcs = res["lru_concurrent"] if isinstance(res["lru_concurrent"], list) else [res["lru_concurrent"]]
    share = lr["budget_mb"] / (res["adapters"] * res["pack_tensor_bytes"] / 2 ** 20)
    lines += ["", f"Alternating rounds, all {res['adapters']} resident: working set of 8 p50 {p['p50_8_ms']:.1f} ms, "
              f"of {res['adapters']} p50 {p['p50_n_ms']:.1f} ms: **{p['ratio_p50']:.3f}x** (p99 {p['p99_8_ms']:.1f} / "
              f"{p['p99_n_ms']:.1f} ms).",
              f"First use (1-row requests one at a time, {res['adapters']} resident): an adapter registered (preloaded) but never requested before "
              f"p50 {fu['first_use_p50_ms']:.1f} ms (max {fu['first_use_max_ms']:.1f}) vs a resident one "
              f"{fu['resident_p50_ms']:.1f} ms.",
              f"The bank growing to {res['adapters']} in process (no server): put p50 {ip['put_p50_ms']:.2f} ms, "
              f"p99 {ip['put_p99_ms']:.1f} ms, longest **{ip['put_max_ms']:.1f} ms** (put #{ip['put_longest_at']}); "
              f"{ip['array_builds']} build(s) of its arrays; load from the store "
              f"p50 {ip['load_p50_ms']:.1f} ms (max {ip['load_max_ms']:.1f}), again with its version known (no "
              f"re-hash) p50 {ip['reload_known_p50_ms']:.2f} ms (max {ip['reload_known_max_ms']:.1f}); a slot {ip['slot_bytes'] / 1e6:.3f} MB "
              f"({ip['slot_bytes'] / res['pack_tensor_bytes']:.3f}x the pack's tensors).",
              f"Replacements: {rp['replacements']} packs rewritten in the store, each named by the next request "
              f"({rp['answered_new_version']} answered by the new version at once); longest request "
              f"{rp['max_ms']:.1f} ms (p50 {rp['p50_ms']:.1f}, p99 {rp['p99_ms']:.1f}).",
              f"LRU, budget {lr['budget_mb']:.0f} MB ({share:.0%} of the packs, {lr['requests']} requests): "
              f"hit p50 {lr['hit_p50_ms']:.1f} ms, miss "
              f"(1 of 8 adapters not resident) p50 {lr['miss_p50_ms']:.1f} ms: **{lr['ratio']:.2f}x**; longest hit "
              f"{lr['hit_max_ms']:.1f} ms, longest miss {lr['miss_max_ms']:.1f} ms; stub RSS {lr['rss_mb']:.0f} MB"
              + (f" (measured once the watcher had hashed the packs not resident ahead of their first use: "
                 f"{res['lru_verify_ahead_s']:.0f} s after the budget filled)." if "lru_verify_ahead_s" in res else "."),
              "", "Under the budget, requests of a working set of 8 resident adapters while a second client's 1-row "
              "requests each miss (a load on the request path + an eviction) vs while it asks for resident ones "
              "(the control), in alternating rounds; each run is 6 rounds (ms):", "",
              "| run | requests | misses (their 1-row p50) | p50 miss rounds / control | p99 miss rounds / control "
              "| longest miss rounds / control | longest: miss rounds less control |", "|---|---|---|---|---|---|---|",
              *[f"| {k + 1} | {c['requests']} | {c['misses']} ({c['miss_1row_p50_ms']:.1f}) | {c['miss_round_p50_ms']:.1f} / "
                f"{c['control_p50_ms']:.1f} | {c['miss_round_p99_ms']:.1f} / {c['control_p99_ms']:.1f} | "
                f"{c['miss_round_max_ms']:.1f} / {c['control_max_ms']:.1f} | "
                f"**{c['miss_round_max_ms'] - c['control_max_ms']:+.1f}** |" for k, c in enumerate(lcs)],
              *exec_lines(res.get("lru_executes")),
              f"Answers vs PyTorch (8 adapters spread over all): max abs diff {res['max_abs_diff']:.1e} "
              f"(under the budget: {res['lru_max_abs_diff']:.1e})."]
    text = "\n".join(lines)
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    plot(res, out.with_suffix(".png"))
    ok = res["max_abs_diff"] <= TOL and res["lru_max_abs_diff"] <= TOL
    print("PASS" if ok else "FAIL (answers differ from PyTorch)")
    return 0 if ok else 1


def exec_lines(ex: dict | None) -> list[str]:
    """The stub's own timing of its executes in those rounds (ms, p50 / max)."""
    if not ex:
        return []
    part = lambda d, k: f"{d[k + '_p50']:.1f} / {d[k + '_max']:.1f}"  # noqa: E731
    out = ["", "The stub's executes in those rounds, timed inside it (ms, p50 / max): whole execute, loads "
           "(`ensure`: read, check, place, evict), forward (`_answer`), residency gauges (`_publish`, one "
           "Triton metric message per adapter that came or went), and loads + gauges in one execute (what a miss "
           "adds to the requests in it or queued behind it)", "",
           "| rounds | executes | loaded a pack | execute | loads | forward | gauges | loads + gauges |",
           "|---|---|---|---|---|---|---|---|"]
    for kind in ("miss", "control"):
        for sub in ("changed", "unchanged"):
            d = ex[kind][sub]
            if d["executes"]:
                out.append(f"| {kind} | {d['executes']} | {'yes' if sub == 'changed' else 'no'} | {part(d, 'total')} | "
                           f"{part(d, 'ensure')} | {part(d, '_answer')} | {part(d, 'publish')} | "
                           f"{part(d, 'bank') if 'bank_p50' in d else '-'} |")
    return out + [""]


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lv = res["levels"]
    xs = [r["adapters"] for r in lv]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(xs, [r["p50_ms"] for r in lv], "o-", label="steady p50")
    a.plot(xs, [r["p99_ms"] for r in lv], "s--", label="steady p99")
    a.plot(xs, [r["growth_max_ms"] or np.nan for r in lv], "^:", label="longest while growing")
    a.plot(xs, [r["control_max_ms"] or np.nan for r in lv], "v:", label="longest, control (no growth)")
    a.set(xscale="log", xlabel="adapters resident", ylabel="ms (8 rows, 8 adapters)", title="latency")
    a.set_ylim(bottom=0)
    a.legend()
    mb = res["pack_tensor_bytes"] / 2 ** 20
    b.plot(xs[1:], [r["rss_mb"] - lv[0]["rss_mb"] for r in lv[1:]], "o-", label=f"stub RSS growth from {xs[0]}")
    b.plot(xs[1:], [(x - xs[0]) * mb for x in xs[1:]], "k--", label="the added packs' own bytes")
    b.set(xscale="log", yscale="log", xlabel="adapters resident", ylabel="MB", title="memory")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
