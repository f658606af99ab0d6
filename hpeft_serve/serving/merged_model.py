"""Triton Python-backend model for ONE merged adapter (`hpeft export CKPT --merge`): the few-adapters,
lowest-latency case; its one output is the graph's (logits, or embeddings for an embedding adapter). Requests are checked (dtype, shape, length, token ids inside the vocabulary the graph's
embedding table holds, masks), padded to the longest sequence, run in one forward pass, and split; should
that forward raise, each request runs alone so that only the one that fails gets an error. Refusals carry
their code (hpeft_serve.serving.codes); an exception never reaches clients as a traceback."""

import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from hpeft_serve.serving.batching import check_tokens, collect, error_response, graph_limits, log_internal, pad_concat
from hpeft_serve.serving.codes import Code
from hpeft_serve.serving.runtime import default_providers

FAILED = "the model failed on this request (internal error; see the server log)"


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=default_providers())
        self.limits = graph_limits(path, int(params.get("MAX_SEQ_LEN", "512")))
        self.output = self.session.get_outputs()[0].name  # logits, or embeddings

    def _read(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
        check_tokens(ids, mask, self.limits)
        return ids, mask

    def _refuse(self, code: Code, message: str):
        return error_response(pb_utils, code, message)

    def _run(self, ids, mask):
        return self.session.run([self.output], {"input_ids": ids, "attention_mask": mask})[0]

    def execute(self, requests):
        try:
            return self._execute(requests)
        except Exception:  # noqa: BLE001 - never an unhandled traceback to clients
            log_internal(pb_utils.Logger.log_error, f"in execute ({len(requests)} requests)")
            return [self._refuse(Code.INTERNAL, FAILED) for _ in requests]

    def _execute(self, requests):
        parsed, responses = collect(requests, self._read, self._refuse, pb_utils.Logger.log_error)
        if not parsed:
            return responses
        try:
            logits = self._run(pad_concat([p[1] for p in parsed]), pad_concat([p[2] for p in parsed]))
        except Exception:  # noqa: BLE001 - defence in depth: each request alone
            log_internal(pb_utils.Logger.log_error, f"in the forward of {len(parsed)} requests; running each alone")
            logits = None
        row = 0
        for i, ids, mask in parsed:
            try:
                out = logits[row:row + len(ids)] if logits is not None else self._run(ids, mask)
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, out)])
            except Exception:  # noqa: BLE001
                log_internal(pb_utils.Logger.log_error, "in the forward of one request")
                responses[i] = self._refuse(Code.INTERNAL, FAILED)
            row += len(ids)
        return responses
