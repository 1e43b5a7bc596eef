VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

MODEL ?=
SERVE_ARGS ?=

.PHONY: venv test lint bench serve clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q

# Reinstall only when the project metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m ruff check server kernels tests bench
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check server kernels tests bench

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/offline_throughput.py

# Without MODEL, the built-in demo model (package data) is served as conveyor-demo.
serve: $(STAMP)
	$(VENV)/bin/conveyor serve $(if $(strip $(MODEL)),--model $(MODEL)) $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
