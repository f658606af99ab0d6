"""hpeft-serve: hybrid parameter-efficient fine-tuning adapters, trained, exported and served."""

__version__ = "0.1.0"
