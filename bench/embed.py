"""Embeddings throughput (issue 11): the same texts, the same 2 threads, in the same run, the variants taking
turns batch by batch (the order rotating each round) so that every variant sees the same machine load; the
ratio to sentence-transformers is the median over rounds of each round's ratio.

- sentence-transformers `encode` on the plain MiniLM (the tool a user would pick today);
- our shared graph in-process (SharedRuntime, onnxruntime) with an embedding adapter (tokenizing included),
  in fp32 and with the backbone's MatMuls int8 (`hpeft export --quantize int8`);
- the full served path, fp32 and int8: the official openai client -> the gateway (POST /v1/embeddings) ->
  tritonserver (one repository, tritonserver and gateway per precision: a repository serves one precision);
- batch-1 latency through the gateway (p50 / p99), fp32 and int8;
- exactness: the plain MiniLM through our graph ('@backbone') vs sentence-transformers, served vs in-process
  (the same graph), and the int8 embeddings' cosine similarity to the fp32 ones;
- the machine's load (/proc/loadavg) before, after every round and at the end: other processes share it.

Texts: held-out BBC bodies (bbc_retrieval), batch 32, up to 256 tokens (MiniLM's max_seq_length). Prints a
table and writes bench/results/embed.md, .json and .png. Needs the bench extra (sentence-transformers).

    python bench/embed.py [--rounds 3] [--texts 256] [--method lora] [--no-serve]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

THREADS, BATCH, MAX_TOKENS = 2, 32, 256


def texts(n: int) -> list[str]:
    """Held-out BBC bodies, each cut at the end of its 254th token (so, with [CLS] and [SEP], every variant
    sees the same text of <= 256 tokens: the gateway refuses longer inputs, as OpenAI does)."""
    from transformers import AutoTokenizer

    from hpeft_serve.assets import tokenizer_folder
    from hpeft_serve.data import load_pairs
    tok = AutoTokenizer.from_pretrained(str(tokenizer_folder("minilm")))
    out = []
    for body in (p.positive for p in load_pairs("bbc_retrieval").test[:n]):
        ends = [e for _, e in tok(body, truncation=True, max_length=MAX_TOKENS, return_offsets_mapping=True)
                ["offset_mapping"] if e]
        out.append(body[:ends[-1]])
    return out


def embedding_ckpt(folder: Path, method: str) -> Path:
    """A MiniLM embedding adapter (random non-zero weights: speed does not depend on training)."""
    from hpeft_serve import checkpoint
    from hpeft_serve.backbone import load_backbone
    from hpeft_serve.methods.presets import resolve
    from hpeft_serve.model import HeadConfig
    from hpeft_serve.training import build_model
    backbone = load_backbone("minilm")
    pooling, normalize = backbone.embedding_defaults()
    model = build_model(backbone, resolve(method, backbone.config.num_hidden_layers),
                        HeadConfig(0, pooling, task="embedding", normalize=normalize), seed=0)
    model.adapters.eject_prefix()
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return checkpoint.save(model, backbone, folder / f"emb-{method}", (), {"bench": "embed"})


def st_encoder():
    from sentence_transformers import SentenceTransformer
    from hpeft_serve.assets import minilm_folder
    m = SentenceTransformer(str(minilm_folder()), device="cpu")
    m.max_seq_length = MAX_TOKENS
    return lambda batch: m.encode(batch, batch_size=BATCH, convert_to_numpy=True)


def runtime_encoder(export: Path, name: str):
    """Tokenize + one forward of the shared graph for the batch (adapter `name`; "@backbone": no adapter)."""
    from hpeft_serve.assets import tokenizer_folder
    from hpeft_serve.serving.runtime import SharedRuntime
    from transformers import AutoTokenizer
    rt = SharedRuntime(export, threads=THREADS)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_folder("minilm")))

    def encode(batch):
        enc = tok(batch, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="np")
        ans = rt.infer(enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64), [name] * len(batch))
        assert not any(ans[1]), ans[1]
        return np.stack(ans[0])
    return encode


def served_encoder(url: str, name: str):
    import openai
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    return lambda batch: np.array([d.embedding for d in client.embeddings.create(model=name, input=batch).data],
                                  np.float32)


def round_throughput(variants: dict, corpus: list[str], order: list[str]) -> dict[str, float]:
    """One round: every batch of the corpus is encoded by each variant in turn (the order rotating from round
    to round), each variant's time summed over the batches: a burst of load from other processes lasting
    seconds hits every variant alike, which whole-corpus rounds, a minute long, do not ensure. texts/s each."""
    spent = dict.fromkeys(variants, 0.0)
    for i in range(0, len(corpus), BATCH):
        batch = corpus[i:i + BATCH]
        for k in order:
            t0 = time.perf_counter()
            variants[k](batch)
            spent[k] += time.perf_counter() - t0
    return {k: len(corpus) / t for k, t in spent.items()}


def batch1_latency(encode, corpus: list[str], n: int) -> tuple[float, float]:
    ts = []
    for t in corpus[:n]:
        t0 = time.perf_counter()
        encode([t])
        ts.append((time.perf_counter() - t0) * 1000)
    ts.sort()
    return statistics.median(ts), ts[min(len(ts) - 1, int(0.99 * len(ts)))]


def serve(repo: Path, stack):
    """tritonserver on `repo` and a gateway in front of it, both stopped when `stack` closes; the gateway's URL."""
    from hpeft_serve.gateway import GatewayThread, Settings
    from hpeft_serve.serving.client import free_ports
    from hpeft_serve.serving.triton import TritonServer
    http, grpc, metrics, gport = free_ports(4)
    triton = TritonServer(repo, http, grpc, metrics, work=repo.parent / f"work-{repo.name}").start()
    stack.callback(triton.stop)
    gw = GatewayThread(Settings(repo=str(repo), triton=f"127.0.0.1:{grpc}", triton_key=triton.key,
                                triton_metrics=f"http://127.0.0.1:{metrics}/metrics", max_tokens=MAX_TOKENS),
                       "127.0.0.1", gport).start()
    stack.callback(gw.stop)
    return f"http://127.0.0.1:{gport}"


def code_version() -> str:
    """The checkout's commit, and the files of the code measured that differ from it (a shared checkout)."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hpeft_serve", "exporters", "bench/embed.py"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return head + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _max_diff(a, b, batch) -> float:
    return float(np.abs(a(batch) - b(batch)).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--texts", type=int, default=256, help="held-out BBC bodies per round")
    ap.add_argument("--latency-requests", type=int, default=100)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--no-serve", action="store_true", help="in-process variants only (no tritonserver, no latency)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/embed"))
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    from exporters.export import export_checkpoint
    from hpeft_serve.serving.deploy import deploy
    corpus = texts(args.texts)
    first = corpus[:BATCH]
    loads, version = [("start", loadavg())], code_version()
    m = args.method
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        print(f"[embed] {m} embedding adapter on minilm: checkpoint, shared exports fp32 and int8, deploy", flush=True)
        ck = embedding_ckpt(tmp, m)
        name = ck.name
        export_checkpoint(ck, tmp / "export", "onnx", log=lambda *_: None)
        export_checkpoint(ck, tmp / "export-int8", "onnx", quantize="int8", log=lambda *_: None)
        variants = {ST: st_encoder(),
                    inproc(m, "fp32"): runtime_encoder(tmp / "export", name),
                    inproc(m, "int8"): runtime_encoder(tmp / "export-int8", name)}
        urls = {}
        if not args.no_serve:
            for prec, export in (("fp32", tmp / "export"), ("int8", tmp / "export-int8")):
                repo = tmp / f"repo-{prec}"
                deploy(export, repo, log=lambda *_: None)
                urls[prec] = serve(repo, stack)
                variants[served(m, prec)] = served_encoder(urls[prec], name)
        for enc in variants.values():  # warm-up (and a check that each answers)
            enc(first)
        exact = {  # the plain backbone through our graph is what sentence-transformers computes
            "backbone_vs_st_max_abs_diff": _max_diff(runtime_encoder(tmp / "export", "@backbone"), variants[ST], first)}
        # both L2-normalised: the row-wise dot product is the cosine similarity
        exact["int8_vs_fp32_min_cosine"] = float((variants[inproc(m, "fp32")](first)
                                                  * variants[inproc(m, "int8")](first)).sum(1).min())
        for prec in urls:
            exact[f"served_vs_inprocess_{prec}_max_abs_diff"] = _max_diff(variants[served(m, prec)],
                                                                          variants[inproc(m, prec)], first)
        runs = {k: [] for k in variants}
        for r in range(args.rounds):
            names = list(variants)
            order = names[r % len(names):] + names[:r % len(names)]
            for k, v in round_throughput(variants, corpus, order).items():
                runs[k].append(v)
            loads.append((f"after round {r + 1}", loadavg()))
            print(f"[embed] round {r + 1}/{args.rounds}: " +
                  ", ".join(f"{v[-1]:.1f}" for v in runs.values()) + f" texts/s; load {loads[-1][1]}", flush=True)
        lat = {}
        for prec in urls:
            lat[prec] = batch1_latency(variants[served(m, prec)], corpus, args.latency_requests)
        loads.append(("end", loadavg()))
    return report(runs, lat, exact, loads, version, args, len(corpus))


ST = "sentence-transformers encode (plain MiniLM)"


def inproc(method: str, prec: str) -> str:
    return f"shared graph in-process + {method}, {prec}" + (" backbone" if prec == "int8" else "")


def served(method: str, prec: str) -> str:
    return f"served: openai -> gateway -> Triton + {method}, {prec}" + (" backbone" if prec == "int8" else "")


def _goal(variant: str) -> float | None:
    """Issue 11's goals against sentence-transformers: in-process >= 1.5x, served >= 1.0x."""
    return None if variant == ST else 1.0 if variant.startswith("served") else 1.5


def plot_title(rounds: int) -> str:
    return (f"embeddings, MiniLM, batch {BATCH}, <= {MAX_TOKENS} tokens, {THREADS} threads\n"
            f"texts/s, median of {rounds} rounds (one run)")


def report(runs: dict, lat: dict, exact: dict, loads: list, version: str, args, n: int) -> int:
    import onnxruntime
    import sentence_transformers
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = {k: statistics.median(x / b for x, b in zip(v, runs[ST])) for k, v in runs.items()}
    lines = [f"Embeddings (bench/embed.py): {n} held-out BBC bodies, batch {BATCH}, <= {MAX_TOKENS} tokens, "
             f"{THREADS} threads, one run of {args.rounds} rounds, the variants taking turns batch by batch; "
             f"texts/s: median over rounds; ratio: median of the rounds' ratios; sentence-transformers "
             f"{sentence_transformers.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}",
             "", "| variant | texts/s (median) | rounds | vs sentence-transformers | goal |", "|---|---|---|---|---|"]
    for k, v in med.items():
        goal = _goal(k)
        lines.append(f"| {k} | {v:.1f} | {', '.join(f'{x:.1f}' for x in runs[k])} | {ratio[k]:.2f}x | "
                     f"{'-' if goal is None else f'>= {goal}x ' + ('met' if ratio[k] >= goal else 'NOT met')} |")
    lines.append("")
    for prec, (p50, p99) in lat.items():
        lines.append(f"batch-1 latency through the gateway, {prec} (openai client, {args.latency_requests} requests): "
                     f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    lines.append("plain MiniLM through our graph ('@backbone') vs sentence-transformers (first batch): "
                 f"max abs diff {exact['backbone_vs_st_max_abs_diff']:.1e}")
    for prec in lat:
        lines.append(f"served vs in-process, {prec}, same adapter (first batch): max abs diff "
                     f"{exact[f'served_vs_inprocess_{prec}_max_abs_diff']:.1e}")
    lines.append(f"int8 vs fp32 embeddings of the same adapter (first batch): min cosine similarity "
                 f"{exact['int8_vs_fp32_min_cosine']:.4f}")
    lines.append(f"code: {version}")
    lines.append("load (/proc/loadavg 1/5/15 min; other processes share the 2 cores): " +
                 "; ".join(f"{when} {la}" for when, la in loads))
    text = "\n".join(lines)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"runs": runs, "median": med, "vs_sentence_transformers": ratio,
         "batch1_ms": {p: {"p50": a, "p99": b} for p, (a, b) in lat.items()}, **exact,
         "loadavg": dict(loads), "code": version, "texts": n, "rounds": args.rounds, "batch": BATCH, "max_tokens": MAX_TOKENS,
         "threads": THREADS, "method": args.method}, indent=2))
    from plots import embed_plot
    embed_plot(med, args.out.with_suffix(".png"), plot_title(args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
