# The two commands of the quickstart. Both install what they need first (torch's CPU wheel before
# anything else: an unpinned torch would pull a multi-GB CUDA build).
PYTHON ?= python3

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"

demo: install  ## the main job: the memory-frontier sweep, smoke size, on an embedded local Ray (CPU, built-in corpus)
	$(PYTHON) -m lmtune.sweep sweeps/memory_frontier.py --smoke

test: install  ## the whole test suite, real runs at tiny sizes (a few minutes on 2 cores)
	$(PYTHON) -m pytest -q

bench: install  ## the benchmarks recorded in BENCHMARKS.md
	for b in benchmarks/*.py; do $(PYTHON) $$b || exit 1; done
