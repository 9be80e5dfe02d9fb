"""Multi-worker trials on a local Ray (2 CPUs), through the sweep command as a user runs it (issue 5).

* a 2-worker trial (Ray Train TorchTrainer, DDP on gloo, micro-batch 8 per rank) ends with the same
  loss and val_loss as a 1-worker trial at micro-batch 16 over the same data;
* it writes one W&B run (offline, in the sweep's group) and one checkpoint stream (rank 0's, in the
  Train run's storage);
* the sweep's driver (and the Ray it started) SIGKILLed after the trial's first checkpoint: ``--resume`` continues
  the trial's Train run from its latest checkpoint (no step before it is reported again), and the trial ends with
  the uninterrupted run's reports and exact final metrics.

A Train worker lost under a trial (its node killed: the trial retried, its Train run continued from its checkpoint
on the nodes left) is tested in test_multinode.py. The sweeps run once per module (fixtures) and the tests read
their results.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, run_module, train_like
from tests.helpers import only_run, rows, sweep_file
from tests.helpers import wait_for as _wait_for

pytestmark = pytest.mark.slow

STEPS = 100  # kills: a worker after the first checkpoint, the driver after the retry's first one
EVAL = 20
MB = 8  # per rank on 2 workers; the 1-worker reference runs 2·MB
FINAL_KEYS = ("loss", "val_loss", "val_ppl", "tokens", "step")


def _sweep_body(name: str, workers: int, mb: int, max_failures: int = 1) -> str:
    return f"""
        sweep = Sweep(
            name="{name}", workers={workers}, max_failures={max_failures},
            base={{**TINY_CPU, "train.steps": {STEPS}, "train.eval_interval": {EVAL}, "train.log_interval": 5,
                   "train.micro_batch_size": {mb}}},
            space={{"train.lr": grid([1e-3])}},
            metric="val_loss", mode="min", export=["train.lr"],
        )
    """


def _run_sweep(tmp: Path, name: str, workers: int, mb: int, *extra: str) -> Path:
    f = sweep_file(tmp, _sweep_body(name, workers, mb))
    storage = tmp / "results"
    proc = run_module("lmtune.sweep", str(f), "--storage", str(storage), "--no-report", *extra, cwd=tmp, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return only_run(storage)


def _final(results: Path) -> tuple[dict[str, str], dict]:
    (row,) = rows(results).values()
    last = json.loads((results / "trials" / row["trial_id"] / "metrics.jsonl").read_text().splitlines()[-1])
    return row, last


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Path:
    """An uninterrupted 2-worker sweep with W&B (offline)."""
    return _run_sweep(tmp_path_factory.mktemp("ddp2"), "ddp2", 2, MB)


@pytest.fixture(scope="module")
def one_worker(two_workers) -> dict:
    """The 2-worker trial's config on one process at twice the micro-batch (the same global batch and data)."""
    (row,) = rows(two_workers).values()
    return train_like(two_workers / "trials" / row["trial_id"] / "summary.json", train__micro_batch_size=2 * MB)


def _train_workers(root: psutil.Process) -> list[psutil.Process]:
    """The Ray Train worker actors among the processes of the sweep (its embedded Ray's workers)."""
    found = []
    for p in root.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _reports(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line the driver is still writing
            break
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A 2-worker sweep whose driver and the Ray it started are SIGKILLed once the trial has made a checkpoint;
    ``--resume`` then continues the same Train run. Returns what each test reads."""
    import threading

    tmp = tmp_path_factory.mktemp("kill")
    f = sweep_file(tmp, _sweep_body("ddp-kill", 2, MB))
    storage = tmp / "results"
    args = ["--storage", str(storage), "--no-wandb", "--no-report", "--no-dashboard"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "lmtune.sweep", str(f), *args], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def trial_dir() -> Path | None:
        return next(iter(storage.glob("*/trials/*")), None)

    try:
        _wait_for(lambda: trial_dir() is not None and any(
            "val_loss" in r for r in _reports(trial_dir() / "metrics.jsonl")), 300, proc)
        workers = _train_workers(psutil.Process(proc.pid))
        assert len(workers) == 2, [p.cmdline() for p in workers]  # the trial's Train run is a group of two
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before_driver_kill = (trial_dir() / "metrics.jsonl").read_text().splitlines()
    again = run_module("lmtune.sweep", str(f), *args, "--resume", cwd=tmp, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    return {"results": only_run(storage), "out": "".join(lines), "before_driver_kill": before_driver_kill,
            "resumed": again.stdout}


def test_two_workers_match_one_worker_at_twice_the_micro_batch(two_workers, one_worker):
    row2, last2 = _final(two_workers)
    assert row2["status"] == one_worker["status"] == "ok"
    assert last2["step"] == one_worker["step"] == STEPS
    assert int(row2["tokens"]) == int(one_worker["tokens"]) == STEPS * 2 * MB * 64  # same global batch, same data
    for key in ("loss", "val_loss"):
        assert float(row2[key]) == pytest.approx(float(one_worker[key]), rel=0, abs=2e-5), key
    # Every eval along the way agrees too, not just the last one (the one-process run's own metrics.jsonl).
    evals2 = {r["step"]: r["val_loss"] for r in _reports(two_workers / "trials" / row2["trial_id"] / "metrics.jsonl")
              if "val_loss" in r}
    assert sorted(evals2) == list(range(EVAL, STEPS + 1, EVAL))
    assert evals2[STEPS] == pytest.approx(one_worker["val_loss"], rel=0, abs=2e-5)


def test_multi_worker_trial_writes_one_wandb_run_and_one_checkpoint_stream(two_workers):
    row, _ = _final(two_workers)
    tid = row["trial_id"]
    # One W&B run (rank 0's), offline, in the sweep's group.
    runs = sorted((two_workers / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert two_workers.name.encode() in b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    # The Train run is named after the trial and keeps its checkpoints (what a retried trial resumes from).
    # One checkpoint stream: the Train run's, rank 0's checkpoint files only (num_to_keep=2).
    train_run = two_workers / "train" / f"train-{tid}"
    ckpts = sorted(p for p in train_run.glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(ckpts) <= 2, ckpts
    for c in ckpts:
        assert sorted(p.name for p in c.rglob("*") if p.is_file()) == ["checkpoint.pt", "config.json"], c
    import torch

    last = max(ckpts, key=lambda c: torch.load(c / "checkpoint.pt", weights_only=False)["step"])
    assert torch.load(last / "checkpoint.pt", weights_only=False)["step"] == STEPS
    # No other Train run, no Tune-level checkpoints, and no other checkpoint files: rank 0 stages each
    # checkpoint in a private temporary directory (outside Tune's trial directory, which Tune uploads while
    # the trainer writes) that Ray Train copies into the run; rank 1 writes none.
    assert [p.name for p in (two_workers / "train").iterdir() if p.is_dir()] == [f"train-{tid}"]
    assert not list((two_workers / "tune").rglob("checkpoint_*"))
    stray = [p.relative_to(two_workers) for p in two_workers.rglob("checkpoint.pt") if train_run not in p.parents]
    assert stray == [], stray
    # The trainer's own outputs are rank 0's alone: one metrics stream with each step once.
    (trainer_dir,) = (two_workers / "tune").rglob("trainer")
    lines = [json.loads(line) for line in (trainer_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val_loss" in r] == list(range(EVAL, STEPS + 1, EVAL))
    samples = trainer_dir / "samples.txt"
    if samples.exists():  # text samples (train.sample_interval): rank 0's, each step once
        heads = [line for line in samples.read_text().splitlines() if line.startswith("--- step ")]
        assert heads and len(heads) == len(set(heads)), heads


def _ray_actors(results: Path) -> set[str]:
    """The classes of the actors the sweep's (first) embedded Ray ran: each worker process's log names its actor."""
    return {line.removeprefix(":actor_name:").strip() for out in (results / "logs" / "ray-session").glob("worker-*.out")
            for line in out.read_text(errors="replace").splitlines() if line.startswith(":actor_name:")}


def test_ray_train_starts_only_the_actors_an_embedded_ray_needs(two_workers, killed):
    """Each Ray actor is a process of its own (~2 CPU-seconds to start on this machine). On an embedded Ray there is
    no preemption to watch for, and without a dashboard nobody reads the Train runs' state: neither actor starts.
    With the dashboard (the default) the Train page has its state."""
    with_dashboard, without = _ray_actors(two_workers), _ray_actors(killed["results"])
    assert {"TrainController", "RayTrainWorker"} <= with_dashboard & without, (with_dashboard, without)
    assert "TrainStateActor" in with_dashboard and "TrainStateActor" not in without, (with_dashboard, without)
    assert "PreemptionWatcher" not in with_dashboard | without, (with_dashboard, without)


def _kinds(path: Path) -> list[tuple[int, bool]]:
    return [(r["step"], "val_loss" in r) for r in _reports(path)]


def test_killed_driver_resumes_the_train_run_from_its_checkpoint_with_uninterrupted_metrics(killed, two_workers):
    """After the trial's checkpoint the driver (and the Ray it started) was SIGKILLed: --resume restarted the trial
    under its id and its Train run continued from the latest Train checkpoint (not from step 0: the reports before
    the kill are still the first ones), ending with the uninterrupted 2-worker run's reports and exact metrics."""
    results = killed["results"]
    row, last = _final(results)
    tid = row["trial_id"]
    assert row["status"] == "ok", (row, killed["out"], killed["resumed"])
    assert "(resumed)" in killed["resumed"] and tid in killed["resumed"]
    before = [json.loads(line) for line in killed["before_driver_kill"]]
    ckpt_step = max(r["step"] for r in before if "val_loss" in r)
    assert ckpt_step >= EVAL
    after = (results / "trials" / tid / "metrics.jsonl").read_text().splitlines()
    assert after[:2] == killed["before_driver_kill"][:2]  # continued, not restarted: the first reports are the first attempt's
    attempts = _reports(results / "trials" / tid / "attempts.jsonl")
    assert len(attempts) == 2, attempts  # the first attempt, the resumed sweep's attempt
    assert 0 < attempts[0]["step"] < attempts[1]["step"] <= STEPS, attempts
    summary = json.loads((results / "trials" / tid / "summary.json").read_text())
    assert summary["resumed_from_step"] >= EVAL, summary["resumed_from_step"]
    # No step up to the checkpoint is reported twice (a restart from step 0 would report steps 5 and 10 again), and
    # the reports made past it before the kill were replaced by the resumed attempt's: the file reads as the
    # uninterrupted run's, report for report.
    ref_file = two_workers / "trials" / _final(two_workers)[0]["trial_id"] / "metrics.jsonl"
    assert _kinds(results / "trials" / tid / "metrics.jsonl") == _kinds(ref_file)
    # The same final metrics as the uninterrupted run (exact on CPU).
    _, ref_last = _final(two_workers)
    assert last["step"] == ref_last["step"] == STEPS
    for key in ("loss", "val_loss", "val_ppl", "tokens"):
        assert last[key] == ref_last[key], (key, last[key], ref_last[key])


def test_a_worker_that_died_unexpectedly_is_an_error_not_an_oom():
    """Ray's message for any unexpected worker exit lists the OOM killer among possible causes; a SIGKILLed
    Train worker must be retried (error), not recorded as oom. A memory-monitor kill still is an OOM."""
    from lmtune.sweep.oom import classify, first_line, is_oom_error

    died = RuntimeError(
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: "
        "Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the "
        "process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the "
        "worker crashed unexpectedly due to SIGSEGV or another unexpected error.")
    assert not is_oom_error(died) and classify(died) == "error"
    assert first_line(died).startswith("RuntimeError: The actor is dead")
    monitor = RuntimeError("Task was killed due to the node running low on memory. Memory on the node was 23.5GB")
    assert is_oom_error(monitor) and classify(monitor) == "oom"
