"""A run's checkpoints: what one holds, where it is written (atomically), reading it back, and the reports it
carries so that a resumed run can send them again (:data:`lmtune.contract.CHECKPOINT_REPORT`).

A checkpoint is a directory (``OUT/checkpoint``, or a private temporary one when checkpoints are staged for
Ray) holding :data:`~lmtune.contract.CHECKPOINT_FILE` (model, optimizer, step, RNG, data position, gradient-noise
state, the reports of its replay window) and :data:`~lmtune.contract.CHECKPOINT_CONFIG` (the flat config).
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.config import Config, ConfigError
from lmtune.contract import CHECKPOINT_CONFIG, CHECKPOINT_DIR, CHECKPOINT_FILE, CHECKPOINT_REPORT
from lmtune.data import Batches
from lmtune.device import Accelerator
from lmtune.model import GPT
from lmtune.training.measure import GradientNoise
from lmtune.training.optim import seed_everything

OLD_SUFFIX = ".old"
"""A checkpoint being replaced is moved aside under this suffix until its successor is in place."""

REPLAY_CHECKPOINTS = 2
"""How many checkpoint intervals of reports a checkpoint holds, sent again on resume (:data:`CHECKPOINT_REPORT`)."""


def rng_state(accel: Accelerator) -> dict:
    """This process's RNG states: torch's CPU generator, numpy's, Python's, and the accelerator's device's."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    device_state = accel.rng_state()
    if device_state is not None:
        state["cuda"] = device_state
    return state


def set_rng_state(state: dict, accel: Accelerator) -> None:
    """Restore RNG states saved by :func:`rng_state`. The setters take CPU ByteTensors only, whatever device
    the model trains on (a checkpoint read with ``map_location=<cuda device>`` would hold CUDA ones)."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        accel.set_rng_state(state["cuda"])


def _replace_dir(tmp: Path, final: Path) -> None:
    """``tmp`` becomes ``final`` with a complete checkpoint at every instant: the old one is moved aside first and
    removed last, so a kill between the renames (a spot reclaim, a lost Ray node) leaves ``final.old``, which
    :func:`read_checkpoint` falls back to. (Removing ``final`` before the rename left no checkpoint at all.)"""
    old = final.with_name(final.name + OLD_SUFFIX)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_file(path: str | Path) -> Path:
    """The file of the checkpoint at ``path`` (a directory or the file itself); where a replacement was cut short
    between its two renames, the previous checkpoint's (``path.old``)."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    aside = path.with_name(path.name + OLD_SUFFIX) / CHECKPOINT_FILE
    return aside if not file.is_file() and aside.is_file() else file


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state, read onto the CPU (``load_state_dict`` then copies each tensor to where its
    parameter lives); a file that cannot be read is one ConfigError naming it."""
    path = Path(path)
    file = checkpoint_file(path)
    if not file.is_file():
        raise ConfigError(f"no checkpoint at {path} (expected a directory holding {CHECKPOINT_FILE}, "
                          f"e.g. OUT/checkpoint).")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ConfigError(f"cannot read checkpoint {file}: {reason} (a truncated or foreign file?)") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
        raise ConfigError(f"{file} is not an lmtune checkpoint (no model/optimizer/step state).")
    return state


class Checkpoints:
    """Save and load one run's checkpoints, and keep its replay window.

    ``enabled``: whether this process writes checkpoints (rank 0 with ``train.checkpoint``). ``stage``: write
    them to a private temporary directory instead of ``out_dir/checkpoint`` (a trial hands each one to Ray,
    which copies it to the sweep's storage; ``out_dir`` lies in Tune's trial directory, which Tune uploads
    while the trainer writes); :meth:`cleanup` removes it once its last checkpoint is no longer needed.

    The replay window: a checkpoint holds the reports of the last :data:`REPLAY_CHECKPOINTS` checkpoint
    intervals, ending with its own. :meth:`window` takes the run's history of reports, which starts with the
    reports of the checkpoint it resumed from (:attr:`replay`) and only grows.
    """

    def __init__(self, cfg: Config, out_dir: Path | None, *, enabled: bool, stage: bool = False):
        self.cfg = cfg
        self.out_dir = out_dir
        self.enabled = enabled
        self.stage = stage
        self.tmp_dir: str | None = None
        self.replay: list[dict[str, Any]] = []
        """The reports of the checkpoint this run resumed from (none for a fresh start)."""
        self._marks: list[int] = []
        """Indices in the history of the reports that went with a checkpoint."""

    def window(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The last report of ``history`` goes with a checkpoint: the reports that checkpoint holds."""
        self._marks.append(len(history) - 1)
        marks = self._marks
        start = marks[-1 - REPLAY_CHECKPOINTS] + 1 if len(marks) > REPLAY_CHECKPOINTS else 0
        return history[start:]

    def replayed(self) -> list[dict[str, Any]]:
        """The reports to send again on resume, marked :data:`CHECKPOINT_REPORT`."""
        return [{**report, CHECKPOINT_REPORT: True} for report in self.replay]

    def save(self, *, model: GPT, optimizer: torch.optim.Optimizer, step: int, first_loss: float | None,
             batches: Batches, noise: GradientNoise, vocab_size: int, reports: list[dict[str, Any]],
             rng: list[dict]) -> str | None:
        """Model, optimizer, step, RNG, data position and ``reports``, written atomically; returns the checkpoint's
        directory (None when this process writes none). ``rng``: every rank's RNG states (:func:`rng_state`), rank
        0's first: ranks draw different dropout masks, and each resumes its own."""
        if not self.enabled:
            return None
        if self.out_dir and not self.stage:
            final = self.out_dir / CHECKPOINT_DIR
        else:
            self.tmp_dir = self.tmp_dir or tempfile.mkdtemp(prefix="lmtune-ckpt-")
            final = Path(self.tmp_dir) / CHECKPOINT_DIR
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "first_loss": first_loss,
                "rng": rng[0],
                "rng_ranks": rng,
                "data": batches.state_dict(),
                "noise": noise.state_dict(),
                "vocab_size": vocab_size,
                "reports": reports,
            },
            tmp / CHECKPOINT_FILE,
        )
        (tmp / CHECKPOINT_CONFIG).write_text(json.dumps(self.cfg.flat(), indent=2))
        _replace_dir(tmp, final)
        return str(final)

    def load(self, path: Path, *, model: GPT, optimizer: torch.optim.Optimizer, batches: Batches,
             noise: GradientNoise, accel: Accelerator, rank: int = 0, world: int = 1) -> dict[str, Any]:
        """Restore model, optimizer, data position, gradient-noise state and RNG from ``path``, and its reports
        into :attr:`replay`; returns the checkpoint's state (``step``, ``first_loss``, …).

        The RNG: this rank's own where the checkpoint holds one per rank of the same group size; in a group of
        another size, rank 0's for rank 0 and, for the others, a stream seeded from (seed, rank, step), since there is
        no saved stream to continue."""
        state = read_checkpoint(path)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            batches.load_state_dict(state["data"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"checkpoint {path} does not fit this config ({str(e).splitlines()[0][:160]}); "
                              f"resume with the config it was saved with (its config.json).") from None
        noise.load_state_dict(state["noise"])
        per_rank = state.get("rng_ranks") or [state["rng"]]
        if len(per_rank) == world or rank == 0:
            set_rng_state(per_rank[rank], accel)
        else:
            seed_everything(self.cfg.train.seed + 1_000_003 * rank + state["step"])
        self.replay = list(state.get("reports") or [])
        # The history starts with these: the next checkpoint's window reaches back before the resume.
        self._marks = [len(self.replay) - 1] if self.replay else []
        return state

    def cleanup(self) -> None:
        """Remove the temporary checkpoint directory (see ``stage``)."""
        if self.tmp_dir:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None
