"""Export speed on MiniLM, CPU (README table): PyTorch eager with adapters (our model), ONNX merged, ONNX
shared (one adapter, and eight mixed), TorchScript, and the same exports with the backbone's MatMuls int8
(`--quantize int8`); the merged LoRA in fp32 and int8 (its graph has the plain backbone's shape: the like-
for-like row against the peers, whatever --method is); beside them, peers on the plain MiniLM (no adapter): transformers eager, a plain
torch.onnx.export of transformers' AutoModel, that export after onnxruntime.transformers' BERT fusions,
and onnxruntime's int8 dynamic quantization of both (what a user who only needs the backbone would take);
and the FLOP floor (the backbone's FLOPs at the fp32 matmul rate measured in the same run). At batch 1 x
seq 32 and batch 32 x seq 128; each rep runs every variant in turn (a few runs untimed, then one timed), medians over
all reps, and the ratios also as medians of per-rep ratios. Plus the
PHMLinear body against a dense MatMul of the same shape, export times and file sizes; PNG plots
(bench/plots.py) beside the json.

    python bench/export.py [--method unipelt] [--reps 30] [--rounds 3] [--out bench/results/export.json]
    python bench/export.py --quick   # iteration only: merged and the shared variants at 1 x 32, nothing written
    python bench/export.py --quick --profile   # and ORT's profile of the two shared graphs by op type

The tables go to stdout and to the json's .md sibling (bench/results/export.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from exporters.export import export_checkpoint, read_layout
from exporters.layout import bank_feed, stack
from hpeft_serve import checkpoint
from hpeft_serve.backbone import load_backbone
from hpeft_serve.methods.presets import resolve
from hpeft_serve.model import HeadConfig
from hpeft_serve.training import build_model

PEER_EAGER = "transformers eager (plain MiniLM)"
PEERS = {"plain": "ORT HF export (plain MiniLM)", "fused": "ORT HF export + fusions",
         "plain int8": "ORT HF export int8", "fused int8": "ORT HF export + fusions, int8"}
FLOOR = "FLOP floor (fp32 matmul rate)"
LORA, LORA8 = "ONNX merged lora (plain backbone's shape)", "ONNX merged lora int8"
UNION = "ONNX shared, 8 methods mixed, the union's graph"  # every batch on it, no signature graph
MIXED = ("unipelt", "mam", "compacter", "sparse_adapter", "lora", "adapter", "s4", "prefix")


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def make_ckpt(backbone, method: str, folder: Path, seed: int, name: str | None = None) -> Path:
    model = build_model(backbone, resolve(method, backbone.config.num_hidden_layers), HeadConfig(2), seed)
    model.adapters.eject_prefix()
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for proj in model.adapters.sparse_projections():
            proj.sparse_mask.copy_(torch.rand(proj.weight.shape) > 0.4)
            proj.weight.mul_(proj.sparse_mask)
    return checkpoint.save(model, backbone, folder / (name or method), ("neg", "pos"), {})


def model_gflop(c, batch: int, seq: int, prefix: int = 0) -> float:
    """Multiply-adds x 2 of the backbone (projections, FFN, attention scores and mix)."""
    d, f, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    per_token = 4 * d * d + 2 * d * f + 2 * (seq + prefix) * d
    return 2 * batch * seq * L * per_token / 1e9


def matmul_gflops(threads: int, n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.set_num_threads(threads)
    ms = median_ms(lambda: a @ b, 5)
    return 2 * n ** 3 / (ms / 1000) / 1e9


def phm_vs_dense(threads: int) -> list[dict]:
    """One hpeft::PHMLinear node (with its body) against one dense MatMul of the same (in, out)."""
    from exporters.ops import FUNCTIONS, OPSET
    rows = []
    for d_in, d_out, n, r in ((384, 12, 4, 1), (12, 384, 4, 1), (768, 3072, 4, 1), (768, 768, 4, 8)):
        m = 4096
        rng = np.random.default_rng(0)
        x = rng.standard_normal((m, d_in), dtype=np.float32)
        w = {"rule": rng.standard_normal((n, n, n), dtype=np.float32),
             "W_left": rng.standard_normal((n, d_in // n, r), dtype=np.float32),
             "W_right": rng.standard_normal((n, r, d_out // n), dtype=np.float32),
             "bias": rng.standard_normal(d_out, dtype=np.float32)}
        inits = [onnx.numpy_helper.from_array(v, k) for k, v in w.items()]
        vi = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["M", d_in])]
        out = [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["M", d_out])]
        node = onnx.helper.make_node("PHMLinear", ["x", *w], ["y"], domain="hpeft")
        phm = onnx.helper.make_model(onnx.helper.make_graph([node], "phm", vi, out, inits),
                                     opset_imports=[onnx.helper.make_opsetid("", OPSET),
                                                    onnx.helper.make_opsetid("hpeft", 1)],
                                     functions=[FUNCTIONS["PHMLinear"].to_function_proto()])
        dense_w = onnx.numpy_helper.from_array(rng.standard_normal((d_in, d_out), dtype=np.float32), "W")
        dense = onnx.helper.make_model(onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])], "dense", vi, out, [dense_w]),
            opset_imports=[onnx.helper.make_opsetid("", OPSET)])
        t = {}
        for name, mdl in (("phm", phm), ("dense", dense)):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            s = ort.InferenceSession(mdl.SerializeToString(), so, providers=["CPUExecutionProvider"])
            t[name] = median_ms(lambda: s.run(None, {"x": x}), 15)
        rows.append({"shape": f"{m}x{d_in} -> {d_out} (n={n}, r={r})", "phm_ms": t["phm"], "dense_ms": t["dense"]})
    return rows


def hf_peers(folder: Path, work: Path) -> dict[str, Path]:
    """The plain MiniLM as a user would export it: torch.onnx.export of transformers' AutoModel (output
    last_hidden_state), the same after onnxruntime.transformers' BERT fusions (attention, skip-LayerNorm,
    GELU), and onnxruntime's int8 dynamic quantization of each (its defaults: every op type it supports)."""
    import warnings
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoConfig, AutoModel

    class Plain(torch.nn.Module):  # keyword arguments: transformers 5's forward takes more positionals
        def __init__(self):
            super().__init__()
            # eager attention: the pattern onnxruntime.transformers' attention fusion matches (sdpa's is not)
            self.hf = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
            self.hf.requires_grad_(False)

        def forward(self, input_ids, attention_mask):
            return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    ids, mask = batch_inputs(2, 16)
    work.mkdir(parents=True, exist_ok=True)
    plain = work / "hf.onnx"
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "last_hidden_state": {0: "batch", 1: "seq"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Plain(), (ids, mask), str(plain), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes=axes, do_constant_folding=True)
    c = AutoConfig.from_pretrained(str(folder))
    fused = work / "hf-fused.onnx"
    optimize_model(str(plain), model_type="bert", num_heads=c.num_attention_heads,
                   hidden_size=c.hidden_size).save_model_to_file(str(fused))
    out = {"plain": plain, "fused": fused}
    for k in ("plain", "fused"):
        out[f"{k} int8"] = work / f"hf-{k}-int8.onnx"
        # DefaultTensorType: the fused graph's com.microsoft ops have no ONNX shape inference
        quantize_dynamic(out[k], out[f"{k} int8"], weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return out


SETTLE = (5, 1)  # untimed runs before each timed one: at batch 1, at larger batches


def timed(variants: dict, reps: int, rounds: int, samples: dict | None = None, settle: int = 1) -> dict[str, float]:
    """Median ms of each variant over `rounds` rounds of `reps` reps, each rep running every variant in turn
    (a noisy, shared machine slows the variants of a rep alike): `settle` times untimed, then once timed, so
    that a timed run follows runs of its own session, as in a server that runs one graph, and not another
    session whose onnxruntime threads still spin on the same cores and whose data fill the caches (timed
    right after another session, the same session and feed measured 1.15x merged at 32 x 128 where, right
    after itself, it measured 1.04x; at 1 x 32 it took a few runs of its own to come back). `samples`, when
    given, gets each variant's times (ms) in rep order: sample i of every variant comes from the same rep."""
    got: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for _ in range(reps):
            for k, fn in variants.items():
                for _ in range(settle):
                    fn()
                t = time.perf_counter()
                fn()
                got[k].append(1000 * (time.perf_counter() - t))
    if samples is not None:
        samples.update(got)
    return {k: statistics.median(v) for k, v in got.items()}


def paired(samples: dict[str, list[float]], a: str, b: str) -> float:
    """The median over reps of a's time / b's time in the same rep."""
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))


def runtime_graph(folder: Path, union, packs: list, threads: int):
    """(session, its bank feed) that SharedRuntime runs a batch of `packs` on in `folder`: the smallest
    signature graph covering them (hpeft_serve/serving/graphs.py), or the union's `union` = (session, feed)."""
    from hpeft_serve.pack.layout import needs
    from hpeft_serve.serving.graphs import SignatureGraphs
    info = json.loads((folder / "backbone.json").read_text())
    graphs = SignatureGraphs(folder, info, lambda p: session(p, threads), print)
    got = graphs.wait([needs({k: v.numpy() for k, v in t.items()}, s) for t, s in packs])
    if got is None:
        return union
    return got[0], {n: v for n, v in union[1].items() if n in got[1].inputs}


def batch_inputs(b: int, s: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    return ids, mask


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="unipelt")
    ap.add_argument("--reps", type=int, default=30, help="timed runs a round at batch 1 (batch 32: reps // 10)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of reps (each rep times every variant once, in turn)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=Path("bench/results/export.json"))
    ap.add_argument("--families", action="store_true",
                    help="then the rows per encoder family (bench/families.py: BERT, DistilBERT, ELECTRA, DeBERTa-v3)")
    ap.add_argument("--quick", action="store_true",
                    help="iteration only: ONNX merged and the three shared fp32 variants at 1 x 32; writes no file")
    ap.add_argument("--profile", action="store_true",
                    help="(implies --quick) onnxruntime's profile (enable_profiling) of the shared graph with one "
                         "adapter's slots and of the 8-method one at 1 x 32: kernel time and runs per op type")
    ap.add_argument("--quick-shape", default="1x32", metavar="BxS",
                    help="the batch x seq of --quick and --profile (e.g. 32x128: the mixed rows use 8 adapters)")
    args = ap.parse_args()
    args.quick = args.quick or args.profile
    torch.set_num_threads(args.threads)
    backbone = load_backbone("minilm")
    work = Path(tempfile.mkdtemp(prefix="hpeft-bench-export-"))
    print(f"checkpoints and exports in {work}", file=sys.stderr)
    ckpts = {m: make_ckpt(backbone, m, work / "ckpt", i) for i, m in enumerate(dict.fromkeys((args.method, *MIXED)))}
    times, sizes = {}, {}
    t = time.perf_counter()
    export_checkpoint(ckpts[args.method], work / "merged", "onnx", merged=True, log=lambda *_: None)
    times["ONNX merged"] = time.perf_counter() - t
    t = time.perf_counter()
    export_checkpoint(ckpts[args.method], work / "ts", "torchscript", merged=True, log=lambda *_: None)
    times["TorchScript (+ .pt2)"] = time.perf_counter() - t
    for i, m in enumerate(ckpts):
        t = time.perf_counter()
        export_checkpoint(ckpts[m], work / "shared", "onnx", log=lambda *_: None)
        times["ONNX shared: graph + first pack" if i == 0 else f"ONNX shared: pack {m}"] = time.perf_counter() - t
        sizes[f"pack {m}"] = (work / "shared" / "packs" / f"{m}.safetensors").stat().st_size
    sizes["merged ONNX (one adapter)"] = (work / "merged" / f"{args.method}.onnx").stat().st_size
    sizes["shared graph backbone.onnx"] = (work / "shared" / "backbone.onnx").stat().st_size
    sizes["shared weights backbone.onnx.data (once)"] = (work / "shared" / "backbone.onnx.data").stat().st_size

    model, _ = checkpoint.load(ckpts[args.method])
    merged = session(work / "merged" / f"{args.method}.onnx", args.threads)
    shared = session(work / "shared" / "backbone.onnx", args.threads)
    ts = torch.jit.load(str(work / "ts" / f"{args.method}.pt"))
    from safetensors.torch import load_file
    packs = {m: (load_file(str(work / "shared" / "packs" / f"{m}.safetensors")),
                 json.loads((work / "shared" / "packs" / f"{m}.json").read_text())["sizes"]) for m in ckpts}
    one_dir = work / "shared-one"  # a graph with only the slots this one adapter uses
    export_checkpoint(ckpts[args.method], one_dir, "onnx", log=lambda *_: None)
    shared_one = session(one_dir / "backbone.onnx", args.threads)
    np_feed = lambda bank, folder: {n: v.numpy() for n, v in bank_feed(bank, read_layout(folder)).items()}  # noqa: E731
    one = np_feed(stack([packs[args.method]]), one_dir)
    eight = np_feed(stack([packs[m] for m in MIXED]), work / "shared")
    same_dir = work / "shared-same"  # eight adapters of one method, mixed in the batch
    same = [make_ckpt(backbone, args.method, work / "ckpt-same", 100 + i, f"{args.method}-{i}") for i in range(8)]
    for ck in same:
        export_checkpoint(ck, same_dir, "onnx", log=lambda *_: None)
    shared_same = session(same_dir / "backbone.onnx", args.threads)
    same_packs = [(load_file(str(same_dir / "packs" / f"{ck.name}.safetensors")),
                   json.loads((same_dir / "packs" / f"{ck.name}.json").read_text())["sizes"]) for ck in same]
    eight_same = np_feed(stack(same_packs), same_dir)
    if args.quick:
        return quick(args, work, merged, shared_one, shared_same, shared, one, eight_same, eight)
    # the same exports with the backbone's MatMuls int8
    q = {"quantize": "int8", "log": lambda *_: None}
    export_checkpoint(ckpts[args.method], work / "merged-int8", "onnx", merged=True, **q)
    for m in ckpts:
        export_checkpoint(ckpts[m], work / "shared-int8", "onnx", **q)
    export_checkpoint(ckpts[args.method], work / "shared-one-int8", "onnx", **q)
    sizes["merged ONNX int8 (one adapter)"] = (work / "merged-int8" / f"{args.method}.onnx").stat().st_size
    sizes["shared int8 weights backbone.onnx.data"] = (work / "shared-int8" / "backbone.onnx.data").stat().st_size
    merged8 = session(work / "merged-int8" / f"{args.method}.onnx", args.threads)
    # like for like with the plain-MiniLM peers: LoRA merges into the backbone's own weights, so its merged
    # graph has the plain backbone's shape (no prefix, gate or extra MatMul), in fp32 and int8
    export_checkpoint(ckpts["lora"], work / "merged-lora", "onnx", merged=True, log=lambda *_: None)
    export_checkpoint(ckpts["lora"], work / "merged-lora-int8", "onnx", merged=True, **q)
    merged_lora = session(work / "merged-lora" / "lora.onnx", args.threads)
    merged_lora8 = session(work / "merged-lora-int8" / "lora.onnx", args.threads)
    shared8 = session(work / "shared-int8" / "backbone.onnx", args.threads)
    shared8_one = session(work / "shared-one-int8" / "backbone.onnx", args.threads)
    peers = {k: session(v, args.threads) for k, v in hf_peers(backbone.folder, work / "hf").items()}
    from transformers import AutoModel
    hf = AutoModel.from_pretrained(str(backbone.folder)).eval()
    gf = matmul_gflops(args.threads)
    rows, samples = [], {}
    for b, s in ((1, 32), (32, 128)):
        ids, mask = batch_inputs(b, s)
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        reps = args.reps if b == 1 else max(2, args.reps // 10)
        idx0 = {"adapter_index": np.zeros(b, np.int64)}
        idx8 = {"adapter_index": (np.arange(b) % 8).astype(np.int64)}
        # the graph the runtime runs this batch's adapters on (at batch 1 its one row's signature graph)
        in_batch = [packs[MIXED[k]] for k in sorted(set(idx8["adapter_index"].tolist()))]
        mixed, mixed_feed = runtime_graph(work / "shared", (shared, eight), in_batch, args.threads)
        mixed8, mixed8_feed = runtime_graph(work / "shared-int8", (shared8, eight), in_batch, args.threads)
        variants = {
            "PyTorch eager (our model)": lambda: model(ids, mask),
            "ONNX merged": lambda: merged.run(["logits"], feed),
            "ONNX shared, 1 adapter": lambda: shared_one.run(["logits"], feed | idx0 | one),
            f"ONNX shared, 8 {args.method} mixed": lambda: shared_same.run(["logits"], feed | idx8 | eight_same),
            "ONNX shared, 8 methods mixed": lambda: mixed.run(["logits"], feed | idx8 | mixed_feed),
            UNION: lambda: shared.run(["logits"], feed | idx8 | eight),
            "TorchScript merged": lambda: ts(ids, mask),
            "ONNX merged int8": lambda: merged8.run(["logits"], feed),
            LORA: lambda: merged_lora.run(["logits"], feed),
            LORA8: lambda: merged_lora8.run(["logits"], feed),
            "ONNX shared int8, 1 adapter": lambda: shared8_one.run(["logits"], feed | idx0 | one),
            "ONNX shared int8, 8 methods mixed": lambda: mixed8.run(["logits"], feed | idx8 | mixed8_feed),
            PEER_EAGER: lambda: hf(input_ids=ids, attention_mask=mask),
        } | {PEERS[k]: (lambda p=p: p.run(None, feed)) for k, p in peers.items()}
        print(f"[export] {b} x {s}: {len(variants)} variants, {args.rounds} rounds of {reps} reps", file=sys.stderr,
              flush=True)
        with torch.no_grad():
            res = timed(variants, reps, args.rounds, samples.setdefault(f"{b}x{s}", {}), SETTLE[b > 1])
        flop = model_gflop(backbone.config, b, s, prefix=10 if args.method == "unipelt" else 0)
        res[FLOOR] = 1000 * model_gflop(backbone.config, b, s) / gf
        for k, ms in res.items():
            rows.append({"batch": b, "seq": s, "variant": k, "ms": ms,
                         "vs_eager": res["PyTorch eager (our model)"] / ms, "vs_merged": ms / res["ONNX merged"],
                         "gflops": flop / (ms / 1000), "of_matmul": flop / (ms / 1000) / gf})
    phm = phm_vs_dense(args.threads)
    pairs = paired_ratios(samples, args.method)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        report(args, gf, rows, phm, times, sizes, pairs)
    sys.stdout.write(buf.getvalue())
    args.out.with_suffix(".md").write_text(buf.getvalue())
    args.out.write_text(json.dumps({"matmul_gflops": gf, "threads": args.threads, "method": args.method,
                                    "rows": rows, "paired": pairs, "phm": phm, "export_s": times, "bytes": sizes},
                                   indent=1))
    from plots import export_plots
    for f in export_plots(json.loads(args.out.read_text()), args.out.with_suffix("")):
        print(f"plot: {f}", file=sys.stderr)
    return 0


def profile_ops(path: Path, feed: dict, threads: int, runs: int = 40) -> tuple[float, dict[str, tuple[float, float]]]:
    """onnxruntime's profile of `runs` runs (the first 5 left out): the median run in ms, and per op type the
    kernel time (ms) and the kernels run, each per run (nodes inside an If's branches count on their own and
    inside the If's time)."""
    import collections
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = str(path.parent / "profile")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(["logits"], feed)
    events = json.loads(Path(s.end_profiling()).read_text())
    model_runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][5:]
    t0, n = model_runs[0]["ts"], len(model_runs)
    us, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0:
            us[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    return (statistics.median(e["dur"] for e in model_runs) / 1000,
            {op: (us[op] / n / 1000, count[op] / n) for op in us})


def quick(args, work, merged, shared_one, shared_same, shared, one, eight_same, eight) -> int:
    """--quick: the rows that the mixed-batch goals compare (same rounds of reps) at --quick-shape (default
    1 x 32), to stdout; the mixed rows' adapters as in the full run (row r: adapter r % 8)."""
    b, s = (int(v) for v in args.quick_shape.lower().split("x"))
    ids, mask = batch_inputs(b, s)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    idx, idx8 = {"adapter_index": np.zeros(b, np.int64)}, {"adapter_index": (np.arange(b) % 8).astype(np.int64)}
    from safetensors.torch import load_file
    folders = [work / "shared" / "packs" / MIXED[k] for k in sorted(set(idx8["adapter_index"].tolist()))]
    mixed, mixed_feed = runtime_graph(work / "shared", (shared, eight), [(load_file(f"{f}.safetensors"),
                                      json.loads(f.with_suffix(".json").read_text())["sizes"]) for f in folders],
                                      args.threads)
    got: dict[str, list[float]] = {}
    res = timed({"ONNX merged": lambda: merged.run(["logits"], feed),
                 "ONNX shared, 1 adapter": lambda: shared_one.run(["logits"], feed | idx | one),
                 f"ONNX shared, 8 {args.method} mixed": lambda: shared_same.run(["logits"], feed | idx8 | eight_same),
                 "ONNX shared, 8 methods mixed": lambda: mixed.run(["logits"], feed | idx8 | mixed_feed),
                 UNION: lambda: shared.run(["logits"], feed | idx8 | eight)},
                args.reps, args.rounds, got, SETTLE[b > 1])
    print(f"{b} x {s}, {args.threads} threads, medians of {args.rounds} rounds of {args.reps} reps (each rep every variant in turn)\n")
    print("| variant | median ms | time vs ONNX merged | median of per-rep ratios |\n|---|---|---|---|")
    for k, ms in res.items():
        print(f"| {k} | {ms:.2f} | {ms / res['ONNX merged']:.2f}x | {paired(got, k, 'ONNX merged'):.3f}x |")
    if args.profile:  # profiling slows every kernel: compare the two columns, not with the times above
        (ms1, one_ops), (ms8, eight_ops) = (profile_ops(work / d / "backbone.onnx", feed | ix | bank, args.threads)
                                            for d, ix, bank in (("shared-one", idx, one), ("shared", idx8, eight)))
        print(f"\nORT profile, {b} x {s} (median run, profiled: 1 adapter's slots {ms1:.2f} ms, 8 methods' {ms8:.2f} ms)\n")
        print("| op type | 8 methods: ms / run | kernels / run | 1 adapter: ms / run | kernels / run |\n|---|---|---|---|---|")
        for op in sorted(set(one_ops) | set(eight_ops), key=lambda o: -eight_ops.get(o, (0, 0))[0]):
            a, b = eight_ops.get(op, (0.0, 0.0)), one_ops.get(op, (0.0, 0.0))
            print(f"| {op} | {a[0]:.3f} | {a[1]:.0f} | {b[0]:.3f} | {b[1]:.0f} |")
        print(f"| all | {sum(v[0] for v in eight_ops.values()):.3f} | {sum(v[1] for v in eight_ops.values()):.0f} | "
              f"{sum(v[0] for v in one_ops.values()):.3f} | {sum(v[1] for v in one_ops.values()):.0f} |")
    return 0


RATIOS = (  # (label, numerator variant, denominator variant): time ratios, < 1 is faster
    ("shared 1 adapter / merged", "ONNX shared, 1 adapter", "ONNX merged"),
    ("shared 8 of one method mixed / merged", "ONNX shared, 8 {m} mixed", "ONNX merged"),
    ("shared 8 methods mixed / merged", "ONNX shared, 8 methods mixed", "ONNX merged"),
    ("shared 8 methods mixed on the union's graph / merged", UNION, "ONNX merged"),
    ("int8: shared 8 methods mixed / merged", "ONNX shared int8, 8 methods mixed", "ONNX merged int8"),
    ("int8 merged / fp32 merged", "ONNX merged int8", "ONNX merged"),
    ("int8 shared 1 adapter / fp32 shared 1 adapter", "ONNX shared int8, 1 adapter", "ONNX shared, 1 adapter"),
    ("int8 merged / ORT HF export int8", "ONNX merged int8", "ORT HF export int8"),
    ("int8 merged / ORT HF export + fusions, int8", "ONNX merged int8", "ORT HF export + fusions, int8"),
    ("fp32 merged / ORT HF export + fusions", "ONNX merged", "ORT HF export + fusions"),
    ("fp32 merged / ORT HF export", "ONNX merged", "ORT HF export (plain MiniLM)"),
    ("fp32 merged lora / ORT HF export", LORA, "ORT HF export (plain MiniLM)"),
    ("int8 merged lora / ORT HF export int8", LORA8, "ORT HF export int8"),
    ("int8 merged lora / ORT HF export + fusions, int8", LORA8, "ORT HF export + fusions, int8"),
    ("int8 merged lora / fp32 merged lora", LORA8, LORA),
)


def paired_ratios(samples: dict[str, dict[str, list[float]]], method: str) -> dict[str, dict[str, float]]:
    """RATIOS as medians of per-rep ratios: label -> {"BxS": ratio} (see `paired`)."""
    out: dict[str, dict[str, float]] = {}
    for label, a, b in RATIOS:
        a = a.format(m=method)
        for shape, got in samples.items():
            if a in got and b in got:
                out.setdefault(label, {})[shape] = paired(got, a, b)
    return out


def ratios(rows: list[dict], method: str | None = None, pairs: dict | None = None) -> None:
    method = method or next(r["variant"].split()[3] for r in rows if r["variant"].startswith("ONNX shared, 8 ")
                            and r["variant"].split()[3] != "methods")
    by = {(r["batch"], r["seq"], r["variant"]): r["ms"] for r in rows}
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in rows))
    pairs = pairs or {}
    print("\n| time ratio (same run; < 1: faster): ratio of medians" + (" (median of per-rep ratios)" if pairs else "")
          + " | " + " | ".join(f"{b} x {s}" for b, s in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for label, a, b in RATIOS:
        a = a.format(m=method)
        cells = []
        for sh in shapes:
            if (*sh, a) not in by or (*sh, b) not in by:
                cells.append("-")
                continue
            p = pairs.get(label, {}).get(f"{sh[0]}x{sh[1]}")
            cells.append(f"{by[(*sh, a)] / by[(*sh, b)]:.2f}x" + (f" ({p:.3f}x)" if p is not None else ""))
        print(f"| {label} | " + " | ".join(cells) + " |")


def report(args, gf, rows, phm, times, sizes, pairs=None) -> None:
    print(f"MiniLM + {args.method}, CPU, {args.threads} threads; medians of {args.rounds} rounds of reps (each rep every variant in turn); "
          f"fp32 matmul 2048^3: {gf:.1f} GFLOP/s (GFLOP/s columns count fp32-equivalent FLOPs)\n")
    print("| batch x seq | variant | median ms | speed-up vs eager | time vs ONNX merged | GFLOP/s | "
          "% of matmul rate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} x {r['seq']} | {r['variant']} | {r['ms']:.2f} | {r['vs_eager']:.2f}x | "
              f"{r['vs_merged']:.2f}x | {r['gflops']:.1f} | {100 * r['of_matmul']:.0f}% |")
    ratios(rows, args.method, pairs)
    print("\n| PHMLinear vs dense MatMul (ORT) | PHM body ms | dense ms | dense / PHM |\n|---|---|---|---|")
    for r in phm:
        print(f"| {r['shape']} | {r['phm_ms']:.3f} | {r['dense_ms']:.3f} | {r['dense_ms'] / r['phm_ms']:.2f}x |")
    print("\n| export | seconds |\n|---|---|")
    for k, v in times.items():
        print(f"| {k} | {v:.2f} |")
    print("\n| file | size |\n|---|---|")
    for k, v in sizes.items():
        print(f"| {k} | {v / 1e6:.2f} MB |" if v > 1e6 else f"| {k} | {v / 1e3:.1f} KB |")
    if args.families:
        import families  # bench/families.py (it imports this module's timer)
        families.main(["--method", args.method, "--threads", str(args.threads), "--rounds", str(args.rounds)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
