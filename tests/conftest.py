"""Shared fixtures: tiny real configurations and an isolated cache/W&B environment per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A model and run small enough for a 2-core CPU, on the built-in corpus with the byte tokenizer.
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "data.dataset=builtin", "data.tokenizer=byte", "data.seq_len=32",
    "train.micro_batch_size=4", "train.steps=20", "train.eval_interval=10", "train.eval_batches=2",
    "train.log_interval=5", "train.measure_interval=5", "train.dtype=float32", "train.compile=false",
    "train.ac_budget=1.0", "train.compile_warmup_steps=2", "train.lr=3e-3", "system.threads=1",
]


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """Token cache and W&B stay inside the test session's temp dir; W&B never goes online."""
    root = tmp_path_factory.mktemp("env")
    os.environ["LMTUNE_CACHE"] = str(root / "cache")
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs as many test processes as cores: one thread each (and in the commands they start), not
        # torch's one per core, whose idle threads spin on cores another test process is using.
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    yield


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory (no ./lmtune.locked.toml from elsewhere is picked up)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_module(module: str, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module args`` as a user would run it; returns the completed process (text output)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


HEAVIEST_FIRST = ("test_frontier_e2e.py", "test_multinode.py", "test_sweep_e2e.py", "test_multiworker.py",
                  "test_resume_anywhere.py", "test_slurm.py", "test_reuse.py", "test_gpu_resources.py", "test_scaling.py",
                  "test_plan.py", "test_prepared.py")
"""The files with the longest end-to-end runs, longest first (1–3 minutes each under ``make test`` on 2 cores)."""


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other files with ``slow`` tests, then the rest. ``make test`` spreads
    the suite over three processes a whole file at a time (pytest-xdist ``--dist loadfile``) in this order: the
    long files start at once and the quick ones fill in around them, instead of a long file starting last.
    (xdist's own order, files with the most tests first, put the long files last: ``make test`` passes
    ``--no-loadscope-reorder`` to keep this one.)"""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item) -> tuple[int, int]:
        name = item.path.name
        return (HEAVIEST_FIRST.index(name) if name in HEAVIEST_FIRST else len(HEAVIEST_FIRST),
                item.path not in slow_files)

    items.sort(key=rank)  # stable: each file's own order is kept


def train_like(summary_json: Path, **changes) -> dict:
    """The final metrics of a trial's config (its ``summary.json``) trained again here, in one process, with
    ``changes`` (flat keys, ``__`` for ``.``): the uninterrupted reference for a sweep's trial, without a sweep."""
    import json

    from lmtune.config import from_flat
    from lmtune.train import Trainer

    flat = dict(json.loads(summary_json.read_text())["config"])
    flat.update({k.replace("__", "."): v for k, v in changes.items()})
    return Trainer(from_flat(flat)).fit()
