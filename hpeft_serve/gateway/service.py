"""What the gateway's routes do, apart from HTTP (`Gateway`): tokenize, call model `hpeft` in Triton over
gRPC, read answers back with the labels of the pack version that answered, keep Triton's state in view
(a dead Python-backend stub is reloaded), and, through `Catalog`, list, validate and store packs.

Text is tokenized here and sent to Triton one row per input, each naming the adapter (Triton's name for the
backbone without adapter is "@backbone"). Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np

from ..errors import HpeftError
from ..names import NAME
from ..pack.layout import BACKBONE  # the adapter name that asks model hpeft for the plain backbone (no adapter)
from ..pack.store import PackStore
from ..serving.client import hpeft_inputs, triton_key_headers
from .catalog import Catalog
from .errors import GatewayError, dead_stub, short, text, triton_error
from .limits import BoundedCache
from .settings import MODEL, Settings

LABEL_CACHE = 4096  # adapter names whose labels and task are kept (least recently answered out first)
ADAPTERS = "GET /v1/adapters lists the adapters"


def read(location: str) -> bytes:
    if "://" in location:
        import fsspec
        with fsspec.open(location, "rb") as f:
            return f.read()
    return Path(location).read_bytes()


class Gateway(Catalog):
    """Tokenizer, Triton client and adapter store of one gateway; `open`/`close` the Triton client."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.info = self._backbone_info()
        self.model_id = str(self.info["backbone"]["name"]).rstrip("/").rsplit("/", 1)[-1]  # OpenAI `model` of no adapter
        self.store = PackStore(settings.store or f"{settings.export}/packs", self.info)
        self._tokenizer, self._tok_lock = None, threading.Lock()
        self._labels = BoundedCache(LABEL_CACHE)  # adapter name -> (version, labels, task) of its last answer
        self._client = None
        self._recovering = threading.Lock()  # held while model hpeft reloads after its stub process died
        self.tokenizer()  # fail at start, not on the first request

    # ------------------------------------------------------------------ backbone, tokenizer, Triton
    def _backbone_info(self) -> dict:
        try:
            return json.loads(read(f"{self.s.export}/backbone.json"))
        except (OSError, FileNotFoundError, json.JSONDecodeError) as e:
            raise HpeftError(f"no shared-backbone export in {self.s.repo} ({e}): deploy one with "
                             "`hpeft deploy EXPORT_DIR --repo REPO`") from None

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            from ..assets import tokenizer_folder
            self._tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(self.info["backbone"]["name"])))
        return self._tokenizer

    def tokenize(self, texts: list[str], max_length: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int64 [batch, seq], padded; cut to `max_length` tokens unless None."""
        with self._tok_lock:  # a fast tokenizer is not safe to call from several threads at once
            enc = self.tokenizer()(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                                   return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def open(self) -> None:
        """Open the Triton client (the app's lifespan does, at start)."""
        self.client()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def client(self):
        if self._client is None:
            import tritonclient.grpc as grpcclient
            # reconnect within a second once Triton is back (gRPC's default backoff grows to two minutes)
            args = [("grpc.max_send_message_length", 2 ** 31 - 1), ("grpc.max_receive_message_length", 2 ** 31 - 1),
                    ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 1000)]
            self._client = grpcclient.InferenceServerClient(self.s.triton, channel_args=args)
        return self._client

    def triton_state(self) -> str | None:
        """None when Triton and model hpeft are ready, else what is wrong."""
        if self._recovering.locked():
            return f"model {MODEL!r} is reloading after its Python-backend stub process died"
        try:
            c = self.client()
            if not c.is_server_ready(client_timeout=2):
                return f"Triton at {self.s.triton} is not ready"
            if not c.is_model_ready(MODEL, client_timeout=2):
                return f"model {MODEL!r} is not loaded in Triton at {self.s.triton}"
        except Exception as e:  # noqa: BLE001 - any transport failure means "not reachable"
            return f"Triton at {self.s.triton} is not reachable ({short(text(e))})"
        return None

    def infer(self, adapter: str, ids: np.ndarray, mask: np.ndarray, unknown: str = "", param: str | None = None):
        """Model hpeft's answer for rows that all name `adapter`, and the version of the pack that answered;
        a failure is the GatewayError its code or Triton's failure means (`unknown`, `param`: the message and
        request field of a 404)."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException
        inputs = hpeft_inputs(grpcclient, ids, mask, [adapter] * len(ids))
        try:
            res = self.client().infer(MODEL, inputs, client_timeout=60, headers={"x-hpeft-adapter": adapter})
        except InferenceServerException as e:
            if dead_stub(text(e)):  # Triton does not restart a dead stub by itself: reload the model
                self.recover()
            raise triton_error(e, adapter, unknown or f"unknown adapter {adapter!r}: {ADAPTERS}", param) from None
        return res, res.as_numpy("adapter_version").reshape(-1)[0].decode()

    def recover(self) -> None:
        """Reload model hpeft (a new stub process; adapters load again from the store) in the background;
        /healthz answers 503 meanwhile. Needs Triton's explicit model-control mode, as `hpeft serve` and
        deploy/ start it."""
        if not self._recovering.acquire(blocking=False):
            return

        def reload():
            try:  # a load of a loaded model whose files did not change is a no-op: unload first
                key = self.triton_key()
                self.client().unload_model(MODEL, headers=key, client_timeout=60)
                self.client().load_model(MODEL, headers=key, client_timeout=300)
            except Exception as e:  # noqa: BLE001 - Triton itself may be gone (/healthz tells), or the key is wrong
                logging.getLogger(__name__).warning("reloading model %r after its stub died failed: %s", MODEL,
                                                    short(text(e)))
            finally:
                self._recovering.release()
        threading.Thread(target=reload, name="hpeft-reload", daemon=True).start()

    def triton_key(self) -> dict[str, str]:
        """The headers of Triton's restricted APIs, for every model-control call: HPEFT_TRITON_KEY (Settings),
        else the key file of a tritonserver on this host (read at each call: a restarted server has a new key)."""
        from ..serving.triton import find_key
        return triton_key_headers(self.s.triton_key or find_key(self.s.triton) or "")

    # ------------------------------------------------------------------ answers
    def pack_info(self, name: str, version: str) -> tuple[tuple, str]:
        """(labels, task) of the pack version that answered (read from the store once per version: no store
        round trip on the request path)."""
        hit = self._labels.get(name)
        if hit is not None and hit[0] == version:
            return hit[1], hit[2]
        meta = self.store.meta(name)
        meta = meta if isinstance(meta, dict) else {}
        labels, task = tuple(meta.get("labels") or ()), str(meta.get("task") or "classification")
        if str(meta.get("sha256", ""))[:16] == version:  # the store may already hold a newer version: keep that out
            self._labels.put(name, (version, labels, task))
        return labels, task

    def labels(self, name: str, version: str) -> tuple:
        return self.pack_info(name, version)[0]

    def answered(self, name: str) -> bool:
        """Whether the adapter answered lately (names that may label metrics: bounded, and real adapters)."""
        return name in self._labels

    def check_texts(self, texts: list[str], status: int = 413) -> None:
        """Too many texts, or one too long: `status`; a lone surrogate: 400. Each message names the input."""
        if len(texts) > self.s.max_inputs:
            raise GatewayError(status, f"{len(texts)} inputs in one request; at most {self.s.max_inputs}", param="input")
        for i, t in enumerate(texts):
            if len(t) > self.s.max_chars:
                raise GatewayError(status, f"input {i} has {len(t)} characters; at most {self.s.max_chars}",
                                   param="input")
            if not t.isascii():
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:  # JSON allows a lone "\ud800"; no tokenizer takes it
                    raise GatewayError(400, f"input {i} is not valid Unicode text: a lone surrogate "
                                            f"{t[e.start]!r} at character {e.start} (surrogates come in pairs)",
                                       param="input") from None

    def predict(self, adapter: str, texts: list[str]) -> dict:
        if not NAME.fullmatch(adapter):
            raise GatewayError(404, f"unknown adapter {adapter!r}: {ADAPTERS}")
        self.check_texts(texts)
        ids, mask = self.tokenize(texts, self.s.max_tokens)
        res, version = self.infer(adapter, ids, mask)
        labels, task = self.pack_info(adapter, version)
        if task == "embedding":
            raise GatewayError(400, f"adapter {adapter!r} is an embedding adapter (no labels): POST /v1/embeddings "
                                    f"with \"model\": {json.dumps(adapter)} answers it")
        out = []
        for row in res.as_numpy("logits"):
            row = row[:len(labels)] if labels else row
            z = np.exp(row - row.max())
            k = int(row.argmax())
            out.append({"label": labels[k] if labels else k, "scores": [round(float(p), 6) for p in z / z.sum()],
                        "logits": [float(x) for x in row]})
        truncated = [int(n) >= self.s.max_tokens for n in mask.sum(1)]  # cut to max_tokens
        return {"adapter": adapter, "version": version, "outputs": out,
                **({"truncated": truncated} if any(truncated) else {})}
