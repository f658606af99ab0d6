"""Triton Python-backend model `hpeft`: the shared-backbone graph in onnxruntime, in-process, with an
adapter bank (hpeft_serve.serving.runtime). Requests are concatenated (padded to the longest sequence),
run in ONE forward pass whatever adapters their rows name, and split back; a request whose rows name an
unknown adapter, or whose tensors have the wrong shape, gets its own error and the others are answered."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from hpeft_serve.serving.batching import check_tokens, collect, pad_concat
from hpeft_serve.serving.runtime import SharedRuntime


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        export = Path(params.get("EXPORT_DIR", "export"))
        if not export.is_absolute():
            export = Path(args["model_repository"]) / args["model_version"] / export
        budget = int(float(params.get("BANK_BUDGET_MB", "1024")) * 2 ** 20)
        pinned = tuple(n for n in params.get("PINNED_ADAPTERS", "").split(",") if n)
        check = params.get("STORE_CHECK_MS", "")
        self.runtime = SharedRuntime(export, budget_bytes=budget, pinned=pinned,
                                     store=params.get("ADAPTER_STORE") or None,
                                     check_every_s=float(check) / 1000 if check else None)
        self.max_len = int(params.get("MAX_SEQ_LEN", "512"))
        pb_utils.Logger.log_info(f"hpeft: graph {export}, onnxruntime providers {self.runtime.session.get_providers()}")
        # which adapters are resident, on Triton's metrics port (the gateway's GET /v1/adapters reads it)
        self.resident = pb_utils.MetricFamily(name="hpeft_adapter_resident", kind=pb_utils.MetricFamily.GAUGE,
                                              description="1 while the adapter is loaded in the bank, else 0")
        self.gauges, self.published = {}, set()

    def _publish(self):
        """Update the gauges of the adapters whose residency changed (each set is a message to Triton)."""
        now = set(self.runtime.bank.names())
        for n in now ^ self.published:
            if n not in self.gauges:
                self.gauges[n] = self.resident.Metric(labels={"adapter": n})
            self.gauges[n].set(1.0 if n in now else 0.0)
        self.published = now

    def _read(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
        names = [n.decode() if isinstance(n, bytes) else str(n)
                 for n in pb_utils.get_input_tensor_by_name(request, "adapter").as_numpy().reshape(-1)]
        check_tokens(ids, mask, self.max_len)
        if len(names) != ids.shape[0]:
            raise ValueError(f"{len(names)} adapter names for {ids.shape[0]} rows: give one per row")
        return ids, mask, names

    def execute(self, requests):
        parsed, responses = collect(requests, self._read,
                                    lambda e: pb_utils.InferenceResponse(error=pb_utils.TritonError(e)))
        if parsed:
            ids, mask = pad_concat([p[1] for p in parsed]), pad_concat([p[2] for p in parsed])
            logits, errors, versions = self.runtime.infer(ids, mask, [n for p in parsed for n in p[3]])
            row = 0
            for i, _, _, names in parsed:
                rows = range(row, row + len(names))
                row += len(names)
                errs = [errors[r] for r in rows if errors[r]]
                if errs:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError("; ".join(dict.fromkeys(errs))))
                    continue
                width = max(len(logits[r]) for r in rows)
                out = np.full((len(names), width), np.finfo(np.float32).min, np.float32)
                for k, r in enumerate(rows):
                    out[k, :len(logits[r])] = logits[r]
                version = np.array([[versions[r].encode()] for r in rows], dtype=object)
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("logits", out),
                                                                          pb_utils.Tensor("adapter_version", version)])
            self._publish()
        return responses
