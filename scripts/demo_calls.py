"""The calls of the main job (scripts/demo.sh), against a running `hpeft serve`: the same texts through the
REST gateway, KServe v2 REST and gRPC, with answers and latencies; then a third adapter uploaded through
the gateway and answered with no restart; last, Triton's model control refused without the server's key.

    python scripts/demo_calls.py --gateway http://127.0.0.1:18080 --http 127.0.0.1:18000 --grpc 127.0.0.1:18001 \
        --adapters rt-unipelt bbc-compacter --hot exports/hot/packs/rt-lora.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.error
import urllib.request

import numpy as np

TEXTS = {"rt": ["A three-hour cinema master class.", "A dark, dull thriller with a parting shot that misfires."],
         "bbc": ["Shares in the carmaker rose 5% after it reported record quarterly profits and raised its dividend.",
                 "The striker scored twice in the second half as the champions came from behind to win the derby."]}


def texts_for(name: str) -> list[str]:
    return TEXTS["bbc" if name.startswith("bbc") else "rt"]


def gateway_predict(url: str, adapter: str, texts: list[str]) -> dict:
    req = urllib.request.Request(f"{url}/v1/predict", json.dumps({"adapter": adapter, "inputs": texts}).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def timed(fn, n: int = 30) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(1000 * (time.perf_counter() - t))
    return statistics.median(ts), float(np.percentile(ts, 99))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--http", required=True, help="Triton HTTP HOST:PORT (KServe v2 REST)")
    ap.add_argument("--grpc", required=True, help="Triton gRPC HOST:PORT")
    ap.add_argument("--adapters", nargs="+", required=True)
    ap.add_argument("--hot", required=True, help="a pack .safetensors to upload while serving")
    args = ap.parse_args()

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from transformers import AutoTokenizer

    from hpeft_serve.assets import minilm_folder
    from hpeft_serve.serving.client import hpeft_inputs
    tok = AutoTokenizer.from_pretrained(str(minilm_folder()))
    http, grpc = httpclient.InferenceServerClient(args.http), grpcclient.InferenceServerClient(args.grpc)

    def triton_call(mod, client, adapter, texts):
        enc = tok(texts, padding=True, return_tensors="np")
        inputs = hpeft_inputs(mod, enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64),
                              [adapter] * len(texts))
        return client.infer("hpeft", inputs).as_numpy("logits")

    rows = []
    for adapter in args.adapters:
        texts = texts_for(adapter)
        out = gateway_predict(args.gateway, adapter, texts)
        print(f"\n== {adapter} (version {out['version']})")
        for text, o in zip(texts, out["outputs"]):
            print(f"  gateway   {o['label']:>10} {max(o['scores']):.2f}  {text}")
        rest = triton_call(httpclient, http, adapter, texts)
        grpc_out = triton_call(grpcclient, grpc, adapter, texts)
        gw = np.array([o["logits"] for o in out["outputs"]])
        fmt = lambda a: "; ".join(" ".join(f"{x:+.4f}" for x in row) for row in a[:, :gw.shape[1]])  # noqa: E731
        print(f"  KServe v2 REST logits {fmt(rest)}")
        print(f"  gRPC           logits {fmt(grpc_out)}")
        print(f"  max |gateway - REST| {np.abs(gw - rest[:, :gw.shape[1]]).max():.1e}, "
              f"|REST - gRPC| {np.abs(rest - grpc_out).max():.1e}")
        one = texts[:1]
        rows += [(adapter, "gateway REST (/v1/predict, tokenizes)", *timed(lambda: gateway_predict(args.gateway, adapter, one))),
                 (adapter, "KServe v2 REST (Triton :http)", *timed(lambda: triton_call(httpclient, http, adapter, one))),
                 (adapter, "gRPC (Triton :grpc)", *timed(lambda: triton_call(grpcclient, grpc, adapter, one)))]

    name = os.path.basename(args.hot).removesuffix(".safetensors")
    def served():  # model hpeft's success count: a reload of the model would reset it
        return grpc.get_inference_statistics("hpeft", as_json=True)["model_stats"][0]["inference_stats"]["success"]["count"]
    before = int(served())
    data = open(args.hot, "rb").read()
    t = time.perf_counter()
    req = urllib.request.Request(f"{args.gateway}/v1/adapters/{name}", data, method="PUT",
                                 headers={"authorization": f"Bearer {os.environ['HPEFT_ADMIN_TOKEN']}",
                                          "content-type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=60) as r:
        put = json.loads(r.read())
    out = gateway_predict(args.gateway, name, texts_for(name))
    swap_ms = 1000 * (time.perf_counter() - t)
    after = int(served())
    print(f"\n== hot swap: PUT /v1/adapters/{name} ({put['size'] / 1e6:.2f} MB, {put['method']}) -> first answer "
          f"in {swap_ms:.0f} ms; model hpeft was not reloaded (its request count went on: {before} -> {after})")
    for text, o in zip(texts_for(name), out["outputs"]):
        print(f"  gateway   {o['label']:>10} {max(o['scores']):.2f}  {text}")
    rows.append((name, "gateway REST (/v1/predict, tokenizes)",
                 *timed(lambda: gateway_predict(args.gateway, name, texts_for(name)[:1]))))

    print("\n| adapter | path | p50 ms | p99 ms |\n|---|---|---|---|")
    for adapter, path, p50, p99 in rows:
        print(f"| {adapter} | {path} | {p50:.1f} | {p99:.1f} |")
    listing = json.loads(urllib.request.urlopen(f"{args.gateway}/v1/adapters", timeout=10).read())["adapters"]
    print("\nGET /v1/adapters: " + ", ".join(f"{a['name']} ({a['method']}, loaded {a['loaded']})" for a in listing))
    print(f"Triton model control without the key: {model_control_refused(args.http)}")
    return 0


def model_control_refused(http: str) -> str:
    """What Triton answers to a model-repository call that lacks the key header (it must refuse)."""
    try:
        urllib.request.urlopen(urllib.request.Request(f"http://{http}/v2/repository/index", b"{}"), timeout=10)
    except urllib.error.HTTPError as e:
        return f"refused ({e.code}: {json.loads(e.read())['error']})"
    return "ANSWERED: the server is not locked down"


if __name__ == "__main__":
    sys.exit(main())
