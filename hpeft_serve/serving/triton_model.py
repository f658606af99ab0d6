"""Triton Python-backend model `hpeft`: the shared-backbone graph in onnxruntime, in-process, with an
adapter bank (hpeft_serve.serving.runtime). Requests are concatenated (padded to the longest sequence),
run in ONE forward pass whatever adapters their rows name, classifiers and embedding adapters mixed, and
split back. Packs registered in the store are loaded into the bank in the background as they arrive
(parameter PRELOAD_MS, default 500: how often the store is checked; 0 turns it off).

Outputs per request: `logits` [rows, widest classifier's labels] (0 wide when every row is an embedding
row; an embedding row's logits and a narrower classifier's padding are float32 min), `embeddings`
[rows, hidden] (an embedding row's embedding; a classifier row's pooled sentence vector, as its head pools,
not normalised), `adapter_version` [rows, 1]. Adapter "@backbone" is the plain backbone's embedding. A
graph exported before embeddings gives no `embeddings` output.

Each request is checked before the forward (dtype, shape, length, token ids inside the vocabulary, masks
of 0/1 with a token in every row, one valid adapter name per row); a request that fails a check, or whose
rows name an adapter that cannot be served, gets its own error and the others are answered. Every refusal
is `[hpeft:CODE] message` with the code's Triton status (hpeft_serve.serving.codes); an exception anywhere
in `execute` becomes an INTERNAL error per request, with the traceback in the server log only.
"""

import json
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from hpeft_serve.pack.layout import BACKBONE
from hpeft_serve.serving.batching import Limits, check_tokens, collect, error_response, log_internal, pad_concat
from hpeft_serve.serving.codes import Code, ModelError
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
        # the store is watched every PRELOAD_MS (0: off) and new or replaced packs are loaded in the background,
        # so that a request is never the one that waits for a pack's first load (runtime.py, "Preloading")
        preload = float(params.get("PRELOAD_MS", "") or "500") / 1000
        # sessions of signature graphs held beside the union's (serving/graphs.py; 0: the union's only)
        sessions = int(params.get("GRAPH_SESSIONS", "") or "4")
        self.runtime = SharedRuntime(export, budget_bytes=budget, pinned=pinned,
                                     store=params.get("ADAPTER_STORE") or None,
                                     check_every_s=float(check) / 1000 if check else None,
                                     log=pb_utils.Logger.log_error, preload_every_s=preload or None,
                                     graph_sessions=sessions)
        graph = self.runtime.limits
        self.limits = Limits(graph.vocab, min(int(params.get("MAX_SEQ_LEN", "512")), graph.max_len))
        pb_utils.Logger.log_info(f"hpeft: graph {export}, onnxruntime providers {self.runtime.session.get_providers()}, "
                                 f"vocabulary {self.limits.vocab}, at most {self.limits.max_len} tokens a row")
        # which adapters are resident, on Triton's metrics port (the gateway's GET /v1/adapters reads it)
        self.resident = pb_utils.MetricFamily(name="hpeft_adapter_resident", kind=pb_utils.MetricFamily.GAUGE,
                                              description="1 while the adapter is loaded in the bank, else 0")
        self.gauges, self.published, self.seen = {}, set(), -1
        # the gauges are published by a thread of their own, never inside execute: a miss's load (or the
        # preloader's) changes the bank, and its metric messages to Triton then delay no request
        self._bank_changed, self._closing = threading.Event(), False
        self._publisher = threading.Thread(target=self._publish_loop, name="hpeft-gauges", daemon=True)
        self._publisher.start()

    def finalize(self):
        self._closing = True
        self._bank_changed.set()
        self._publisher.join(timeout=5)
        self.runtime.stop_preloading()

    def _publish_loop(self, every_s: float = 0.5):
        """Publish the residency gauges when execute says the bank changed, and every `every_s` (the
        preloader changes the bank between requests)."""
        while not self._closing:
            self._bank_changed.wait(every_s)
            self._bank_changed.clear()
            if self._closing:
                return
            try:
                self._publish()
            except Exception:  # noqa: BLE001 - a metrics failure must not stop the gauges or the model
                log_internal(pb_utils.Logger.log_error, "publishing the residency gauges")

    def _publish(self):
        """Update the gauges of the adapters whose residency changed (each set is a message to Triton); nothing
        to do, and no walk over thousands of names, while the bank did not change."""
        generation = self.runtime.bank.generation
        if generation == self.seen:
            return
        now = set(self.runtime.bank.names()) - {BACKBONE}  # the backbone is no adapter
        for n in now ^ self.published:
            if n not in self.gauges:
                self.gauges[n] = self.resident.Metric(labels={"adapter": n})
            self.gauges[n].set(1.0 if n in now else 0.0)
        self.published, self.seen = now, generation

    def _read(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
        mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
        check_tokens(ids, mask, self.limits)
        raw = pb_utils.get_input_tensor_by_name(request, "adapter").as_numpy().reshape(-1)
        try:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
        except UnicodeDecodeError:
            raise ModelError(Code.INVALID_INPUT, "adapter names must be UTF-8 text") from None
        if len(names) != ids.shape[0]:
            raise ModelError(Code.INVALID_INPUT, f"{len(names)} adapter names for {ids.shape[0]} rows: give one per row")
        return ids, mask, names

    def _refuse(self, code: Code, message: str):
        return error_response(pb_utils, code, message)

    def execute(self, requests):
        try:
            return self._execute(requests)
        except Exception:  # noqa: BLE001 - never an unhandled traceback to clients
            log_internal(pb_utils.Logger.log_error, f"in execute ({len(requests)} requests)")
            return [self._refuse(Code.INTERNAL, "the model failed on this batch (internal error; see the server log)")
                    for _ in requests]

    def _execute(self, requests):
        parsed, responses = collect(requests, self._read, self._refuse, pb_utils.Logger.log_error)
        if parsed:
            ids, mask = pad_concat([p[1] for p in parsed]), pad_concat([p[2] for p in parsed])
            answers = self.runtime.infer(ids, mask, [n for p in parsed for n in p[3]])
            row = 0
            for i, _, _, names in parsed:
                rows = range(row, row + len(names))
                row += len(names)
                responses[i] = self._respond(rows, answers)
            if self.runtime.bank.generation != self.seen:
                self._bank_changed.set()  # the publisher thread updates the gauges, off the request path
        return responses

    def _respond(self, rows, answers):
        """One request's response: its rows' logits (padded to the widest classifier's labels), embeddings and
        versions, or its rows' errors joined, with the code of the first."""
        out, errors, versions = answers
        errs = [errors[r] for r in rows if errors[r]]
        if errs:
            return self._refuse(getattr(errs[0], "code", Code.INTERNAL), "; ".join(dict.fromkeys(errs)))
        classify = {r for r in rows if answers.tasks[r] != "embedding"}
        width = max((len(out[r]) for r in classify), default=0)
        logits = np.full((len(rows), width), np.finfo(np.float32).min, np.float32)
        for k, r in enumerate(rows):
            if r in classify:
                logits[k, :len(out[r])] = out[r]
        version = np.array([[versions[r].encode()] for r in rows], dtype=object)
        tensors = [pb_utils.Tensor("logits", logits), pb_utils.Tensor("adapter_version", version)]
        if self.runtime.layout.embeddings:
            emb = np.stack([answers.embeddings[r] for r in rows]).astype(np.float32, copy=False)
            tensors.append(pb_utils.Tensor("embeddings", emb))
        return pb_utils.InferenceResponse(output_tensors=tensors)
