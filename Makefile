# Two commands set up a fresh machine: `make run` (the service on SQLite with the shipped model)
# and `make test` (the whole suite). Both create or reuse the virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
WEIGHTS ?= artifacts/best_attention_unet.pth
# modelVersion in responses: bump it when the shipped weights change.
MODEL_VERSION ?= 6

.PHONY: run test export train evaluate quantize bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.full: requirements.txt requirements-export.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt -r requirements-export.txt -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime
	$(BIN)/python -m service

test: $(VENV)/.full
	$(BIN)/python -m pytest -q

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

clean:
	rm -rf $(VENV) .pytest_cache
