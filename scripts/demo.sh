#!/usr/bin/env bash
# The main job on the embedded default (MiniLM + real data from PyPI, the real tritonserver):
#   1. train two adapters of different methods: UniPELT on rotten_tomatoes, Compacter++ on bbc_news
#      (and a LoRA on rotten_tomatoes, kept back for the hot swap)
#   2. export them: one shared-backbone graph + a pack per adapter (and a standalone merged ONNX model)
#   3. deploy them into model_repository and start tritonserver + the REST gateway (hpeft serve; Triton on
#      loopback, its model control behind a key; the gateway is the public face)
#   4. call them over the gateway (REST), KServe v2 REST and gRPC; print answers and latencies
#   5. upload the third adapter through the gateway while serving: answered with no restart
#   6. stop everything it started
set -euo pipefail
VENV=${VENV:-.venv}
HPEFT=$VENV/bin/hpeft
PORT=${DEMO_PORT:-18000}  # Triton HTTP; gRPC +1, metrics +2, gateway +80
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HPEFT_ADMIN_TOKEN=${HPEFT_ADMIN_TOKEN:-demo-$RANDOM$RANDOM}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/6 train (MiniLM, real data, 2 threads)"
$HPEFT train --backbone minilm --method unipelt --task rotten_tomatoes --train-size 1000 --out runs/rt-unipelt
$HPEFT train --backbone minilm --method compacter_pp --task bbc_news --train-size 300 --out runs/bbc-compacter
$HPEFT train --backbone minilm --method lora --task rotten_tomatoes --train-size 500 --out runs/rt-lora

step "2/6 export"
rm -rf exports/shared exports/hot
$HPEFT export runs/rt-unipelt --out exports/shared
$HPEFT export runs/bbc-compacter --out exports/shared       # extends the shared graph with PHM slots
$HPEFT export runs/rt-lora --out exports/hot                 # its pack is uploaded later, while serving
$HPEFT export runs/rt-unipelt --out exports/merged --merge   # standalone ONNX, for any runtime

step "3/6 deploy + serve (tritonserver and the gateway)"
rm -f model_repository/hpeft/1/export/packs/rt-lora.*        # the hot-swap adapter is not there at start
$HPEFT deploy exports/shared --repo model_repository
$HPEFT serve --repo model_repository --http-port $PORT --grpc-port $((PORT + 1)) --metrics-port $((PORT + 2)) \
  --gateway-port $((PORT + 80)) &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT  # TERM: a background job ignores SIGINT
GW=http://127.0.0.1:$((PORT + 80))
for _ in $(seq 240); do curl -sf $GW/healthz >/dev/null && break; kill -0 $SERVER || exit 1; sleep 0.5; done
curl -sf $GW/healthz; echo

step "4/6 + 5/6 calls: gateway REST, KServe v2 REST, gRPC; hot swap"
echo "curl -s $GW/v1/predict -H 'content-type: application/json' -d '{\"adapter\": \"rt-unipelt\", \"inputs\": [\"A three-hour cinema master class.\"]}'"
curl -s $GW/v1/predict -H 'content-type: application/json' \
  -d '{"adapter": "rt-unipelt", "inputs": ["A three-hour cinema master class."]}'; echo
$HPEFT predict --adapter bbc-compacter --url 127.0.0.1:$((PORT + 1)) \
  "The central bank raised interest rates by a quarter point to curb inflation."
$VENV/bin/python scripts/demo_calls.py --gateway $GW --http 127.0.0.1:$PORT --grpc 127.0.0.1:$((PORT + 1)) \
  --adapters rt-unipelt bbc-compacter --hot exports/hot/packs/rt-lora.safetensors

step "6/6 stop"
kill $SERVER; wait $SERVER || true
trap - EXIT
echo "done: the server and the gateway are stopped"
