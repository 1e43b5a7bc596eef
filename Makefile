VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

MODEL ?=
SERVE_ARGS ?=

.PHONY: venv test lint bench serve clean

# Checked while the Makefile is read, so a missing MODEL fails before any install work.
ifneq ($(filter serve,$(MAKECMDGOALS)),)
ifeq ($(strip $(MODEL)),)
$(error make serve needs MODEL=<local Hugging Face model directory>, e.g. make serve MODEL=~/models/Qwen2.5-0.5B-Instruct (a built-in demo model is planned))
endif
endif

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

serve: $(STAMP)
	$(VENV)/bin/conveyor serve --model $(MODEL) $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
