# Two commands do all set-up on a fresh machine:
#   make run      install into .venv (first time only), then the whole pipeline (mlflow run .)
#   make test     install into .venv (first time only), then run the test suite
# make train runs the train step alone.
VENV ?= .venv
# Pinned: these builds are known to import together (see docs/development.md).
TORCH ?= torch==2.14.1 torchvision==0.29.1
EPOCHS ?= 5

# Put the venv first on PATH, so `mlflow run --env-manager local` starts its Python.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run train test quick durations bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install $(TORCH)
	$(VENV)/bin/pip install -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	mlflow run . --env-manager local

train: $(VENV)/.installed
	mlflow run . -e train --env-manager local -P epochs=$(EPOCHS)

# Two workers, whole test files each, the slowest files first (tests/timing.py).
PYTEST = python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder
test: $(VENV)/.installed
	$(PYTEST)

# The edit loop's tier: the tests that start no server and take under two seconds each.
quick: $(VENV)/.installed
	$(PYTEST) --quick

# The whole suite, writing each test's time to tests/durations.json (commit it with the results).
durations: $(VENV)/.installed
	$(PYTEST) --record-durations

bench: $(VENV)/.installed
	python bench/train_speed.py
