"""Export of hpeft checkpoints: merged ONNX (hpeft custom ops with function bodies) and TorchScript, and the
shared-backbone graph with adapter packs (layout.py, shared.py, export.py; op schemas in OPS.md)."""
