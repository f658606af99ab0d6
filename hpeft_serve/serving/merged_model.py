"""Triton Python-backend model for ONE merged adapter (`hpeft export CKPT --merge`): the few-adapters,
lowest-latency case. Requests are padded to the longest sequence, run in one forward pass, and split."""

import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from hpeft_serve.serving.batching import check_tokens, collect, pad_concat
from hpeft_serve.serving.runtime import default_providers


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=default_providers())
        self.max_len = int(params.get("MAX_SEQ_LEN", "512"))

    def _read(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
        check_tokens(ids, mask, self.max_len)
        return ids, mask

    def execute(self, requests):
        parsed, responses = collect(requests, self._read,
                                    lambda e: pb_utils.InferenceResponse(error=pb_utils.TritonError(e)))
        if parsed:
            logits = self.session.run(["logits"], {"input_ids": pad_concat([p[1] for p in parsed]),
                                                   "attention_mask": pad_concat([p[2] for p in parsed])})[0]
            row = 0
            for i, ids, _ in parsed:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("logits", logits[row:row + len(ids)])])
                row += len(ids)
        return responses
