"""Triton Python-backend model `hpeft` (the class lives in hpeft_serve/serving/triton_model.py)."""

from hpeft_serve.serving.triton_model import TritonPythonModel  # noqa: F401
