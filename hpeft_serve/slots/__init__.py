"""Slot kinds of the shared layout, one module each, listed in registry.py (see base.py for what a kind declares)."""
