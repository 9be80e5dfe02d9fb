# The README's two commands (`make demo`, `make test`) set everything up themselves: a project virtual
# environment in .venv (so a distribution's PEP 668 Python works), torch first, then lmtune with its test extra.
#
# torch is pinned here, once. On a Linux machine PyPI's torch wheel is the CUDA build (several GB): right for a
# GPU machine. On a machine without a GPU, the CPU-only build is ~10x smaller:
#     make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmtune-installed

.PHONY: install demo test lint bench gpu-check cuda-coverage clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; install your Python's venv module (Debian/Ubuntu: apt install python3-venv) or set PYTHON=/path/to/python3"; exit 2; }
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $@

install: $(STAMP)  ## the project environment in .venv (once; again when pyproject.toml changes)

demo: install  ## the main job: the memory-frontier sweep, smoke size, on an embedded local Ray (CPU, built-in corpus)
	$(PY) -m lmtune.sweep sweeps/memory_frontier.py --smoke

# The suite runs in TEST_PROCS processes, a test file each at a time, the longest files first (tests/conftest.py's
# order: xdist's own, files with the most tests first, would start them last). Three on two cores: the end-to-end
# tests wait on the processes they start, and a third keeps the cores busy (512 s against 560 s with two, the same
# tree the same hour, 2026-12-03). More cores: TEST_PROCS=auto, or one and a half per core.
TEST_PROCS ?= 3
test: install  ## the whole test suite, real runs at tiny sizes (about 9 minutes on 2 cores)
	$(PY) -m pytest -q -n $(TEST_PROCS) --dist loadfile --no-loadscope-reorder

lint: install  ## ruff (pyproject.toml's rules: pycodestyle, pyflakes, import order, private Ray/Optuna/torch names fenced in)
	$(PY) -m ruff check lmtune benchmarks tests sweeps

bench: install  ## the benchmarks recorded in BENCHMARKS.md (one at a time: they time the machine)
	for b in trainer_vs_bare token_cache prepare trial_overhead frontier_search memory_model oom_aware_search width_transfer reuse scaling_ladder; do \
		$(PY) benchmarks/$$b.py || exit 1; done

# The GPU acceptance run needs no environment: torch, numpy and tiktoken of whatever Python has them (a GPU
# machine's own), from this source tree. Without a CUDA device it says so and exits 0.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
OUT ?= benchmarks/results
gpu-check:  ## the GPU acceptance checks against the phase-0 table (benchmarks/gpu_check.py): ≤ 8 minutes on one CUDA GPU; OUT=DIR for the report
	PYTHONPATH=. $(GPU_PYTHON) benchmarks/gpu_check.py --out $(OUT)

cuda-coverage: install  ## the share of lmtune's CUDA-only lines the CPU tests run (through the fake CUDA backend)
	$(PY) benchmarks/cuda_coverage.py

clean:  ## what lmtune and Ray leave that can be made again: Ray's session logs and the token cache (python -m lmtune.clean)
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m lmtune.clean
