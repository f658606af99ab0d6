"""The client side of model `hpeft`: its inputs (token ids, mask, one adapter name per row) for
tritonclient.grpc or tritonclient.http, the key header that Triton's restricted APIs (model control,
shared memory, trace, logging) need, and free loopback ports for servers started by tests and benches."""

from __future__ import annotations

import os
import socket

import numpy as np


def hpeft_inputs(mod, ids: np.ndarray, mask: np.ndarray, names: list[str], ids_dtype: str = "INT64") -> list:
    """`mod` is tritonclient.grpc or tritonclient.http; ids and mask are [batch, seq]."""
    inputs = [mod.InferInput("input_ids", list(ids.shape), ids_dtype),
              mod.InferInput("attention_mask", list(mask.shape), "INT64"),
              mod.InferInput("adapter", [len(names), 1], "BYTES")]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(mask)
    inputs[2].set_data_from_numpy(np.array([[n.encode()] for n in names], dtype=object))
    return inputs


# Triton's state-changing APIs answer only requests that carry this header with the server's key
# (tritonserver --http-restricted-api / --grpc-restricted-protocol). The key comes from HPEFT_TRITON_KEY;
# it is not the gateway's admin token, which never enters tritonserver's environment.
TRITON_KEY_HEADER = "hpeft-triton-key"
TRITON_KEY_ENV = "HPEFT_TRITON_KEY"
# over gRPC, tritonserver 2.51 reads a restricted-protocol key from the metadata "triton-grpc-protocol-<name>";
# over HTTP from the header "<name>" itself
GRPC_KEY_HEADER = f"triton-grpc-protocol-{TRITON_KEY_HEADER}"


def triton_key_headers(key: str | None = None) -> dict[str, str]:
    """Headers for a model-control call (load, unload, ...) over HTTP or gRPC (both names, so one dict serves
    either client): the given key, else HPEFT_TRITON_KEY."""
    key = key if key is not None else os.environ.get(TRITON_KEY_ENV, "")
    return {TRITON_KEY_HEADER: key, GRPC_KEY_HEADER: key} if key else {}


def free_ports(n: int = 3) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
