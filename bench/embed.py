"""Embeddings throughput (issue 11): the same texts, the same 2 threads, in the same run, measured in
alternating rounds so that every variant sees the same machine load.

- sentence-transformers `encode` on the plain MiniLM (the tool a user would pick today);
- our shared graph in-process (SharedRuntime, onnxruntime) with an embedding adapter (tokenizing included),
  in fp32 and with the backbone's MatMuls int8 (`hpeft export --quantize int8`; its embeddings' cosine
  similarity to the fp32 ones is reported);
- the full served path: the official openai client -> the gateway (POST /v1/embeddings) -> tritonserver;
- batch-1 latency through the gateway (p50 / p99).

Texts: held-out BBC bodies (bbc_retrieval), batch 32, up to 256 tokens (MiniLM's max_seq_length). Prints a
table and writes bench/results/embed.md, .json and .png. Needs the bench extra (sentence-transformers).

    python bench/embed.py [--rounds 3] [--texts 256] [--method lora] [--no-serve]
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


def throughput(encode, corpus: list[str]) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(corpus), BATCH):
        encode(corpus[i:i + BATCH])
    return len(corpus) / (time.perf_counter() - t0)


def batch1_latency(encode, corpus: list[str], n: int) -> tuple[float, float]:
    ts = []
    for t in corpus[:n]:
        t0 = time.perf_counter()
        encode([t])
        ts.append((time.perf_counter() - t0) * 1000)
    ts.sort()
    return statistics.median(ts), ts[min(len(ts) - 1, int(0.99 * len(ts)))]


def serve(repo: Path):
    from hpeft_serve.gateway import GatewayThread, Settings
    from hpeft_serve.serving.client import free_ports
    from hpeft_serve.serving.triton import TritonServer
    http, grpc, metrics, gport = free_ports(4)
    triton = TritonServer(repo, http, grpc, metrics, work=repo.parent / "work").start()
    gw = GatewayThread(Settings(repo=str(repo), triton=f"127.0.0.1:{grpc}", triton_key=triton.key,
                                triton_metrics=f"http://127.0.0.1:{metrics}/metrics", max_tokens=MAX_TOKENS),
                       "127.0.0.1", gport).start()
    return triton, gw, f"http://127.0.0.1:{gport}"


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
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"[embed] {args.method} embedding adapter on minilm: checkpoint, shared export, deploy", flush=True)
        ck = embedding_ckpt(tmp, args.method)
        export_checkpoint(ck, tmp / "export", "onnx", log=lambda *_: None)
        export_checkpoint(ck, tmp / "export-int8", "onnx", quantize="int8", log=lambda *_: None)
        name = ck.name
        if not args.no_serve:
            deploy(tmp / "export", tmp / "repo", log=lambda *_: None)
            triton, gw, url = serve(tmp / "repo")
        try:
            variants = {ST: st_encoder(),
                        f"shared graph in-process + {args.method} adapter": runtime_encoder(tmp / "export", name),
                        f"shared graph int8 in-process + {args.method} adapter":
                            runtime_encoder(tmp / "export-int8", name)}
            if not args.no_serve:
                variants[f"served: openai -> gateway -> Triton + {args.method}"] = served_encoder(url, name)
            for enc in variants.values():  # warm-up (and a check that each answers)
                enc(corpus[:BATCH])
            # the plain backbone through our graph is what sentence-transformers computes
            agree = float(np.abs(runtime_encoder(tmp / "export", "@backbone")(corpus[:BATCH])
                                 - variants[ST](corpus[:BATCH])).max())
            fp32, int8 = list(variants.values())[1:3]
            cos = float((fp32(corpus[:BATCH]) * int8(corpus[:BATCH])).sum(1).min())  # both L2-normalised
            runs = {k: [] for k in variants}
            for r in range(args.rounds):
                for k, enc in variants.items():
                    runs[k].append(throughput(enc, corpus))
                print(f"[embed] round {r + 1}/{args.rounds}: " +
                      ", ".join(f"{v[-1]:.1f}" for v in runs.values()) + " texts/s", flush=True)
            lat = None if args.no_serve else batch1_latency(list(variants.values())[3], corpus, args.latency_requests)
        finally:
            if not args.no_serve:
                gw.stop()
                triton.stop()
    return report(runs, lat, agree, cos, args, len(corpus))


ST = "sentence-transformers encode (plain MiniLM)"


def _goal(variant: str) -> float | None:
    """Issue 11's goals against sentence-transformers: in-process >= 1.5x, served >= 1.0x."""
    return None if variant == ST else 1.0 if variant.startswith("served") else 1.5


def report(runs: dict, lat: tuple | None, agree: float, cos: float, args, n: int) -> int:
    import onnxruntime
    import sentence_transformers
    med = {k: statistics.median(v) for k, v in runs.items()}
    base = med[ST]
    lines = [f"Embeddings (bench/embed.py): {n} held-out BBC bodies, batch {BATCH}, <= {MAX_TOKENS} tokens, "
             f"{THREADS} threads, median of {args.rounds} alternating rounds; sentence-transformers "
             f"{sentence_transformers.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}",
             "", "| variant | texts/s (median) | rounds | vs sentence-transformers | goal |", "|---|---|---|---|---|"]
    for k, v in med.items():
        goal = _goal(k)
        lines.append(f"| {k} | {v:.1f} | {', '.join(f'{x:.1f}' for x in runs[k])} | {v / base:.2f}x | "
                     f"{'-' if goal is None else f'>= {goal}x ' + ('met' if v / base >= goal else 'NOT met')} |")
    lines += [""] + ([] if lat is None else [
              f"batch-1 latency through the gateway (openai client, {args.latency_requests} requests): "
              f"p50 {lat[0]:.1f} ms, p99 {lat[1]:.1f} ms"]) + [
              f"plain MiniLM through our graph ('@backbone') vs sentence-transformers: max abs diff {agree:.1e}",
              f"int8 vs fp32 embeddings of the same adapter (first batch): min cosine similarity {cos:.4f}"]
    text = "\n".join(lines)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"runs": runs, "median": med, "batch1_ms": lat,
                                                         "backbone_vs_st_max_abs_diff": agree,
                                                         "int8_vs_fp32_min_cosine": cos}, indent=2))
    from plots import embed_plot
    embed_plot(med, args.out.with_suffix(".png"), f"embeddings, MiniLM, batch {BATCH}, <= {MAX_TOKENS} tokens, "
               f"{THREADS} threads (median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
