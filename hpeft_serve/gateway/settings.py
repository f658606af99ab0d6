"""The gateway's settings: from arguments, else the HPEFT_* environment variables (`ENV`), else defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from ..serving.client import TRITON_KEY_ENV

MODEL = "hpeft"  # the Triton model behind every route
ENV = {"repo": "HPEFT_REPO", "triton": "HPEFT_TRITON_GRPC", "triton_metrics": "HPEFT_TRITON_METRICS",
       "store": "HPEFT_ADAPTER_STORE", "admin_token": "HPEFT_ADMIN_TOKEN", "triton_key": TRITON_KEY_ENV,
       "max_upload_mb": "HPEFT_MAX_UPLOAD_MB", "max_inputs": "HPEFT_MAX_INPUTS", "max_chars": "HPEFT_MAX_CHARS",
       "max_tokens": "HPEFT_MAX_TOKENS"}


@dataclass
class Settings:
    repo: str = "model_repository"  # a folder or an fsspec URL (s3://bucket/model_repository)
    triton: str = "localhost:8001"  # gRPC HOST:PORT
    triton_metrics: str = ""  # http://HOST:PORT/metrics; default: Triton's host, port 8002
    store: str = ""  # the adapter store; default REPO/hpeft/1/export/packs
    admin_token: str = ""  # bearer token for PUT/DELETE; empty: writes are refused
    triton_key: str = ""  # the key of Triton's restricted APIs (model reload); default: its key file on this host
    max_upload_mb: float = 64.0
    max_inputs: int = 64  # texts (or token lists) in one request
    max_chars: int = 20_000  # characters of one text
    max_tokens: int = 512  # tokens of one input: predict truncates to it, embeddings refuse more

    @classmethod
    def from_env(cls, **given) -> "Settings":
        values = {}
        for f in fields(cls):
            v = given.get(f.name)
            if v is None and os.environ.get(ENV[f.name]):
                v = os.environ[ENV[f.name]]
            if v is not None:
                values[f.name] = type(f.default)(v)
        return cls(**values)

    def __post_init__(self):
        if not self.triton_metrics:
            self.triton_metrics = f"http://{self.triton.rsplit(':', 1)[0]}:8002/metrics"

    @property
    def export(self) -> str:
        return f"{str(self.repo).rstrip('/')}/{MODEL}/1/export"

    @property
    def upload_limit(self) -> int:
        """Bytes of a PUT /v1/adapters/{name} body."""
        return int(self.max_upload_mb * 2 ** 20)

    @property
    def json_limit(self) -> int:
        """Bytes of any other body: a predict request at its limits, each character a 6-byte JSON escape."""
        return self.max_inputs * (6 * self.max_chars + 4) + 65536
