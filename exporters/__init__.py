"""ONNX and TorchScript export of hpeft checkpoints (issue 3): not implemented yet."""
