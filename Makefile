# Two commands do all the set-up on a fresh machine:
#   make demo   QLoRA-fine-tunes SmolLM2-135M-Instruct on a small shipped dataset (CPU or GPU)
#   make test   the test suite (CPU; GPU tests run with `make test-gpu` on a machine with CUDA)
# Both create or reuse .venv. TORCH pins the CPU build that lies on this machine's disk; on a GPU
# machine with torch already installed, use `make test-gpu` with PYTHON=python3 instead.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: demo test test-fast test-gpu bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m lora.demo

# Everything that runs without a GPU, slow tests included (what CI runs).
test: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not gpu" -q

# The quick loop while developing: slow tests skipped.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# On a CUDA machine whose python already has torch and triton (the lent GPU): no venv. Kernels take
# their first config untimed (KERNELS_TUNE=0, kernels/launch.py), so the math is checked in minutes;
# `make test-gpu KERNELS_TUNE=1 JOBS=1` times every config per shape, as users' calls do. The tests
# are compile-bound, so JOBS pytest processes share them (tests/run_gpu.py).
KERNELS_TUNE ?= 0
JOBS ?= 8
test-gpu:
	KERNELS_TUNE=$(KERNELS_TUNE) PYTHONPATH=. $(PYTHON) -m tests.run_gpu --jobs $(JOBS)

bench:
	PYTHONPATH=. $(PYTHON) -m benchmarks.nf4_matmul

clean:
	rm -rf $(VENV) .pytest_cache
