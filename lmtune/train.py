"""The trainer's command: a GPT trained autoregressively, with the phase-0 study's measurements.

    python -m lmtune.train [FILE.toml ...] [section.key=value ...] [--out DIR] [--resume DIR/checkpoint]

The trainer itself is :class:`lmtune.training.Trainer` (re-exported here: ``from lmtune.train import Trainer``).
It reports through a plain callable ``report(metrics, checkpoint_dir)``; the sweep layer binds that to Ray.
This module never imports ray (a test checks it), so it runs the same on a laptop, inside a Tune trial, or on
every worker of a Ray Train data-parallel group (``torch.distributed`` initialized).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from lmtune import config as config_lib
from lmtune.cli import check_output_dir, parse_command_line, user_errors_exit_2
from lmtune.config import Config, ConfigError
from lmtune.contract import CHECKPOINT_CONFIG, CHECKPOINT_DIR, SUMMARY_JSON
from lmtune.training import Diverged, Report, Trainer, read_checkpoint
from lmtune.training.checkpoint import checkpoint_file

__all__ = ["Diverged", "RESUMABLE_KEYS", "Report", "Trainer", "main", "read_checkpoint", "resume_config"]

RESUMABLE_KEYS = (
    "train.steps", "train.epochs", "train.eval_interval", "train.eval_batches", "train.eval_sequences",
    "train.log_interval", "train.measure_interval", "train.sample_interval", "train.checkpoint", "train.compile",
    "train.compile_mode", "train.compile_warmup_steps", "train.ac_budget", "train.divergence_factor",
    "system.device", "system.memory_limit_gib", "system.threads",
)
"""Keys ``--resume`` may change: how long and how the run goes on, never what its checkpoint holds (model,
data order, optimizer and its schedule)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lmtune.train",
        description="Train a GPT with lmtune's defaults (built-in < locked defaults < files < key=value).",
    )
    p.add_argument("args", nargs="*", metavar="FILE.toml | section.key=value")
    p.add_argument("--out", help="output directory (default: runs/train-<timestamp>; with --resume, the run's own)")
    p.add_argument("--resume", metavar="DIR/checkpoint",
                   help="continue a run from its checkpoint, with the config saved next to it; only keys that "
                        "do not change what the checkpoint holds may be given (steps, intervals, …)")
    p.add_argument("--locked", metavar="FILE", help="locked-defaults TOML to use (default: ./lmtune.locked.toml "
                   "if present, over the shipped phase-0 defaults)")
    p.add_argument("--no-wandb", action="store_true", help="do not log a W&B run")
    p.add_argument("--describe", action="store_true",
                   help="list every config key with the value this command would use, where it comes from, and its doc")
    return p


def resume_config(checkpoint: str | Path, overrides: list[str], files: list[str]) -> tuple[Config, int]:
    """The config a checkpoint was saved with (its config.json), with ``overrides`` of :data:`RESUMABLE_KEYS`
    only (anything else would not fit what the checkpoint holds), and the checkpoint's step."""
    path = Path(checkpoint)
    if files:
        raise ConfigError(f"--resume takes the config saved with the checkpoint; config files ({', '.join(files)}) "
                          f"are not accepted. Give only keys such as train.steps=N.")
    step = read_checkpoint(path)["step"]  # a missing or unreadable checkpoint is named before its config
    saved = checkpoint_file(path).parent / CHECKPOINT_CONFIG
    try:
        flat = json.loads(saved.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"--resume {path}: no readable config.json next to the checkpoint "
                          f"(the trainer writes both into OUT/checkpoint).") from None
    changes = config_lib.parse_overrides(overrides)
    refused = [k for k in changes if k not in RESUMABLE_KEYS]
    if refused:
        key = refused[0]
        raise ConfigError(f"{key} cannot change on --resume: the checkpoint holds a run with {key}={flat.get(key)!r}. "
                          f"Keys --resume accepts: {', '.join(RESUMABLE_KEYS)}.")
    return config_lib.apply(config_lib.from_flat(flat), changes), step


def finished_line(checkpoint: str, step: int, total: int) -> str:
    return (f"lmtune.train: {checkpoint} is at step {step} and this run has {total} step(s): nothing to train, "
            f"nothing changed. Give train.steps=N above {step} to train on.")


def _wandb_id(out: Path) -> str:
    """A run directory's W&B id, so that a resumed run continues its W&B run."""
    return f"{out.name[:40]}-{hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:10]}"


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(_parser(), argv, "FILE.toml and section.key=value arguments")
    files = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if args.resume:
        cfg, at_step = resume_config(args.resume, overrides, files)
        config_lib.validate(cfg)
        if not cfg.train.epochs and at_step >= cfg.train.steps:  # (with train.epochs the Trainer finds it out)
            print(finished_line(args.resume, at_step, cfg.train.steps))
            return 0
        sources = None
        default_out = checkpoint_file(args.resume).parent.parent  # RUN/checkpoint(.old)/checkpoint.pt → RUN
    else:
        cfg, sources = config_lib.resolve(files, overrides, locked=args.locked)
        default_out = Path(f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.describe:
        print(config_lib.describe(cfg, sources or {k: "the checkpoint's config.json" for k in cfg.flat()}))
        return 0
    out = Path(args.out) if args.out else default_out
    if not args.resume and ((out / SUMMARY_JSON).exists() or (out / CHECKPOINT_DIR).exists()):
        raise ConfigError(f"--out {out} already holds a run; pass --resume {out / CHECKPOINT_DIR} "
                          "to continue it, or choose a new --out.")
    check_output_dir(out, "--out")
    if not args.resume:
        print(f"lmtune.train: locked defaults {', '.join(str(p) for p in config_lib.locked_files(args.locked))}")
    else:
        print(f"lmtune.train: resuming {args.resume} into {out}")
    trainer = Trainer(
        cfg, out_dir=out, resume_from=args.resume, progress=True,
        wandb=None if args.no_wandb else {"project": "lmtune", "name": out.name, "dir": str(out),
                                          "id": _wandb_id(out), "resume": "allow"},
    )
    summary = trainer.fit()
    if trainer.finished_before:
        print(finished_line(args.resume, trainer.step, trainer.plan.total_steps))
        return 0
    shown = {k: summary[k] for k in ("status", "step", "tokens", "loss", "val_loss", "val_ppl", "tokens_per_s",
                                     "peak_reserved_gib") if k in summary}
    print(json.dumps(shown, indent=2))
    print(f"results: {out / SUMMARY_JSON}")
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
