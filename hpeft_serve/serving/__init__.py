"""Serving: the adapter bank and the in-process runtime that the Triton model (issue 4) will wrap.
numpy + onnxruntime at run time; packs come from an adapter store (a folder of packs)."""
