"""The adapter pack format, torch-free, imported by exporters (which write packs) and serving (which reads
them): the slot layout and sizes (layout.py), validation of a pack against a served graph (check.py), the
adapter store that holds packs (store.py)."""
