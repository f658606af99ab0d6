"""The hybrid PEFT methods: building blocks (LoRA, prefix, bottleneck/PHM/sparse adapters, BitFit, gates),
their configuration (config.py) and named presets (presets.json, presets.py); `adapter_set.AdapterSet`
places them in an encoder. Import from the submodules (this package imports nothing heavy)."""
