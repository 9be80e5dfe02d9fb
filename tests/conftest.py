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
