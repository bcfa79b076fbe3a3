# Two commands set up a fresh machine: `make run` (the service on SQLite with the shipped model)
# and `make test` (the whole suite). Both create or reuse the virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
WEIGHTS ?= artifacts/best_attention_unet.pth
# modelVersion in responses: bump it when the shipped weights change.
MODEL_VERSION ?= 6

.PHONY: run test test-fast lint format export train evaluate quantize bench bench-scale clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.full: requirements.txt requirements-export.txt requirements-dev.txt | $(BIN)/python
	@echo "Installing the development environment into $(VENV) (torch CPU, onnx, pytest, ruff): 1–2 minutes the first time"
	$(BIN)/pip install --progress-bar off -r requirements.txt -r requirements-export.txt -r requirements-dev.txt | grep -E '^(Collecting|Successfully)' || true
	touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime
	$(BIN)/python -m service

# The whole suite, one line per test file as it goes, the slowest tests at the end.
test: $(VENV)/.full
	$(BIN)/python -m pytest

# The inner loop: everything but the process, export and training tests.
test-fast: $(VENV)/.full
	$(BIN)/python -m pytest -m "not slow"

lint: $(VENV)/.full
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.full
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

export: $(VENV)/.full
	$(BIN)/python -m export --weights $(WEIGHTS) --out artifacts/attention_unet.onnx --model-version $(MODEL_VERSION)

train: $(VENV)/.full
	$(BIN)/python -m export.train --data $(DATA) --out $(WEIGHTS)

evaluate: $(VENV)/.full
	$(BIN)/python -m export.evaluate --model artifacts/attention_unet.onnx --data $(DATA) --manifest artifacts/manifest.json

quantize: $(VENV)/.full
	$(BIN)/python -m export.quantize --model artifacts/attention_unet.onnx --data $(DATA)

# Needs wrk for the HTTP part (apt-get install wrk); run on an otherwise idle machine.
bench: $(VENV)/.full
	$(BIN)/python -m benchmarks.engine
	$(BIN)/python -m benchmarks.http
	$(BIN)/python -m benchmarks.latency

# One run, about 6 minutes: the engine, the service (WEB_WORKERS=1 and default), the FastAPI peer and
# the old service's way at 1, 16 and 64 connections, fp32 and int8; PSS, idle CPU, the cost of /metrics.
bench-scale: $(VENV)/.full
	$(BIN)/pip install -q -r benchmarks/peers/requirements.txt
	$(BIN)/python -m benchmarks.scale --name scale-$$(date -u +%m%d)

clean:
	rm -rf $(VENV) .pytest_cache
