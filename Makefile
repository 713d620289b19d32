# fedcore's two commands, each doing its own set-up on a fresh machine:
#   make run    the main job: a simulated federation on the bundled digits dataset
#   make test   every test, the slow integration tests included (what CI runs)
# and, for daily work:
#   make test-quick   the tests not marked slow
#   make bench        the benchmarks

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Every pip call honours these pins: torch 2.13.0 is a local CPU wheel on these machines, and a
# resolver left alone would pull a CUDA build of several gigabytes.
export PIP_CONSTRAINT := $(CURDIR)/.ci/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export FLWR_TELEMETRY_ENABLED ?= 0

# The torch build setup installs. Default: the pinned CPU wheel. A CUDA build goes in a second
# virtual environment, so that .venv, `make run` and `make test` stay as they are (README, "GPUs"):
#   make setup VENV=.venv-cuda TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: run test test-quick bench lint setup

setup: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedcore simulate $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/simulation_overhead.py

lint: $(STAMP)
	$(BIN)/ruff check fedcore clients server tests benchmarks experiments
	$(BIN)/mypy fedcore
