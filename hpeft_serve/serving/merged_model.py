"""Triton Python-backend model for ONE merged adapter (`hpeft export CKPT --merge`): the few-adapters,
lowest-latency case. Requests are padded to the longest sequence, run in one forward pass, and split."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.max_len = int(params.get("MAX_SEQ_LEN", "512"))

    def _read(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [batch, seq]")
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds the maximum {self.max_len}")
        return ids, mask

    def execute(self, requests):
        parsed, responses = [], [None] * len(requests)
        for i, req in enumerate(requests):
            try:
                parsed.append((i, *self._read(req)))
            except ValueError as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        if parsed:
            seq = max(p[1].shape[1] for p in parsed)
            pad = lambda a: np.pad(a, ((0, 0), (0, seq - a.shape[1])))  # noqa: E731
            logits = self.session.run(["logits"], {"input_ids": np.concatenate([pad(p[1]) for p in parsed]),
                                                   "attention_mask": np.concatenate([pad(p[2]) for p in parsed])})[0]
            row = 0
            for i, ids, _ in parsed:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("logits", logits[row:row + len(ids)])])
                row += len(ids)
        return responses
