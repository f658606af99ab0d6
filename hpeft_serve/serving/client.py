"""The client side of model `hpeft`: its inputs (token ids, mask, one adapter name per row) for
tritonclient.grpc or tritonclient.http, and free loopback ports for servers started by tests and benches."""

from __future__ import annotations

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


def free_ports(n: int = 3) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
