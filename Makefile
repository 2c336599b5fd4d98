# Two entry points on a fresh machine (both create/reuse the virtualenv at .venv):
#   make demo   -- dvc repro on the embedded `shapes` dataset, then the metrics table
#   make test   -- the default test suite (what CI runs)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

# Offline, quiet, reproducible: see docs/DESIGN.md and the README.
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export DVC_NO_ANALYTICS := 1
export PYTHONHASHSEED := 0
# dvc.yaml commands call `python`: the venv must come first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

# `dvc plots show` fills this page template (.dvc/config plots.html_template): vega inlined, nothing fetched.
PLOTS_TEMPLATE := .dvc/offline_plots.html

.PHONY: setup browser demo test test-all lint bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[pipeline,dev]'
	touch $@

$(PLOTS_TEMPLATE): $(VENV)/.installed pipeline/plots.py
	$(PY) -m pipeline.plots --out $@

setup: $(VENV)/.installed $(PLOTS_TEMPLATE)

# The HTML gallery test renders in a real headless browser: Debian's chromium (no browser download at run time).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "install Debian's chromium (sudo apt-get install chromium) for the gallery test" >&2; exit 1; fi; }

demo: setup
	$(VENV)/bin/dvc repro
	$(PY) -m stages.evaluate --show --metrics metrics.json

test: setup browser
	$(PY) -m pytest -q

test-all: setup browser
	$(PY) -m pytest -q -m "not gpu"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/bench_similarity.py
