# The two set-up commands of the README: `make demo` (install + the main job) and `make test` (install + tests).
VENV ?= .venv
HPEFT := $(VENV)/bin/hpeft
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test bench-quality bench-export bench-embed deploy-check

install:
	VENV=$(VENV) ./scripts/install.sh

demo: install
	VENV=$(VENV) ./scripts/demo.sh

bench-export: install
	$(VENV)/bin/python -m pip install -q -e ".[bench]"  # matplotlib: its PNG plots
	$(VENV)/bin/python bench/export.py

test: install
	$(VENV)/bin/python -m pytest tests

bench-quality: install
	$(VENV)/bin/python bench/quality.py

bench-embed: install
	$(VENV)/bin/python -m pip install -q -e ".[bench]"
	$(VENV)/bin/python bench/embed.py

# deploy/ run for real with podman: images built, compose and `podman kube play` stacks run, checked and torn
# down (deploy/README.md, "The real run"). Minutes, as root; not part of `make test`.
deploy-check: install
	$(VENV)/bin/python deploy/check.py
