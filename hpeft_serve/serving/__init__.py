"""Serving with the real tritonserver: the runtime (one onnxruntime session on the shared graph plus an
adapter bank, packs loaded from the adapter store on first use), the Triton Python-backend models that wrap
it (triton_model: `hpeft`, merged_model: one merged adapter), the batching both share, the error codes they
send (codes), finding and running tritonserver (triton), `hpeft deploy` (deploy), and the client side
(client). numpy + onnxruntime at run time, no torch; the pack format itself is hpeft_serve/pack."""
