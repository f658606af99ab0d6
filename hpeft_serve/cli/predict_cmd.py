"""`hpeft predict --adapter NAME TEXT... [--url localhost:8001]`: tokenize, call model hpeft over gRPC."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--adapter", required=True)
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC HOST:PORT")
    p.add_argument("--backbone", default="minilm", help="whose tokenizer to use")
    p.add_argument("--repo", type=Path, default=Path("model_repository"), help="to read the adapter's labels")
    p.add_argument("--max-length", type=int, default=128)


def run(args) -> int:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from ..backbone import load_backbone
    from ..errors import HpeftError
    from ..serving.client import hpeft_inputs
    enc = load_backbone(args.backbone).tokenizer()(args.texts, padding=True, truncation=True,
                                                   max_length=args.max_length, return_tensors="np")
    inputs = hpeft_inputs(grpcclient, enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64),
                          [args.adapter] * len(args.texts))
    try:
        logits = grpcclient.InferenceServerClient(args.url).infer("hpeft", inputs).as_numpy("logits")
    except InferenceServerException as e:
        raise HpeftError(f"{args.url}: {e.message()}") from None
    meta = args.repo / "hpeft" / "1" / "export" / "packs" / f"{args.adapter}.json"
    labels = json.loads(meta.read_text())["labels"] if meta.is_file() else None
    for text, row in zip(args.texts, logits):
        k = int(row.argmax())
        print(json.dumps({"text": text, "label": labels[k] if labels else k, "logits": [round(float(x), 5) for x in row]}))
    return 0
