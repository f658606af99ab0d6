#!/usr/bin/env bash
# The main job on the embedded default: train an adapter on MiniLM + real data, export it (standalone ONNX
# and the shared backbone + pack), deploy it to a freshly started tritonserver, call it over gRPC and
# REST (KServe v2), and stop the server.
set -euo pipefail
VENV=${VENV:-.venv}
HPEFT=$VENV/bin/hpeft
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
$HPEFT train --backbone minilm --method unipelt --task rotten_tomatoes --train-size 1000 --out runs/rt-unipelt
$HPEFT export runs/rt-unipelt --out exports/rt-unipelt --merge
$HPEFT export runs/rt-unipelt --out exports/shared
$HPEFT deploy exports/shared --repo model_repository
$HPEFT serve --repo model_repository --http-port 18000 --grpc-port 18001 --metrics-port 18002 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT  # TERM: a background job ignores SIGINT
for _ in $(seq 120); do curl -sf localhost:18000/v2/models/hpeft/ready >/dev/null && break; sleep 0.5; done
$HPEFT predict --adapter rt-unipelt --url localhost:18001 "A three-hour cinema master class." \
  "A dark, dull thriller with a parting shot that misfires."
echo "KServe v2 REST:"
curl -s localhost:18000/v2/models/hpeft/infer -H 'Content-Type: application/json' -d '{"inputs": [
  {"name": "input_ids", "datatype": "INT64", "shape": [1, 6], "data": [101, 1037, 2307, 3185, 999, 102]},
  {"name": "attention_mask", "datatype": "INT64", "shape": [1, 6], "data": [1, 1, 1, 1, 1, 1]},
  {"name": "adapter", "datatype": "BYTES", "shape": [1, 1], "data": ["rt-unipelt"]}]}'
echo
