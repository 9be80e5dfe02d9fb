"""Real sweeps on a local Ray (2 CPUs) with the real trainer at tiny sizes.

* a grid sweep through Optuna with ASHA: one trials.csv row per trial with ok / pruned / oom, the best
  trial printed is the table's best, the ASHA-stopped trial is PRUNED in optuna.db, an OOM is COMPLETE there
  with its memory constraint violated, the printed TensorBoard and optuna-dashboard commands open the sweep,
  W&B offline runs are written under the sweep's group;
* a driver killed with SIGKILL mid-sweep and resumed: finished trials are not run again, the interrupted
  trial continues from its checkpoint;
* Ctrl-C, then SIGTERM to the job (`timeout`), each followed by --resume; a trial killed by Ray's memory monitor.

Multi-worker trials (Ray Train) are tested in test_multiworker.py.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_module
from tests.helpers import only_run, rows, sweep_file
from tests.helpers import wait_for as _wait_for

pytestmark = pytest.mark.slow


def test_asha_sweep_statuses_optuna_and_wandb(tmp_path):
    # Trials run one at a time in grid order: (lr 3e-3, mb 8) sets the bar at each ASHA rung, lr 1e-5 falls
    # below it at the first rung and is stopped; micro-batch 1024 crosses the emulated memory limit.
    f = sweep_file(tmp_path, """
        sweep = Sweep(
            name="asha-e2e",
            base={**TINY_CPU, "train.steps": 30, "system.memory_limit_gib": 0.75},
            space={"train.lr": grid([3e-3, 1e-5]), "train.micro_batch_size": grid([8, 1024])},
            metric="val_loss", mode="min", scheduler="asha", grace_tokens=10 * 8 * 64, reduction_factor=2,
            export=["train.lr"],
        )
    """)
    storage = tmp_path / "results"
    # The Ray dashboard (~3 CPU-seconds of its processes) is the Ctrl-C test's; this one opens optuna-dashboard.
    proc = run_module("lmtune.sweep", str(f), "--storage", str(storage), "--max-concurrent", "1", "--no-dashboard",
                      cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = only_run(storage)
    assert results.name.startswith("1-asha-e2e-")
    table = rows(results)
    assert len(table) == 4
    by_point = {(float(r["train.lr"]), int(r["train.micro_batch_size"])): r for r in table.values()}
    assert by_point[(3e-3, 8)]["status"] == "ok"
    assert by_point[(1e-5, 8)]["status"] == "pruned"
    assert by_point[(3e-3, 1024)]["status"] == "oom" and by_point[(1e-5, 1024)]["status"] == "oom"
    assert float(by_point[(1e-5, 8)]["tokens"]) < float(by_point[(3e-3, 8)]["tokens"])  # stopped early

    # The console names the best trial, and it is the table's best ok trial.
    best_id = by_point[(3e-3, 8)]["trial_id"]
    assert f"best: {best_id}  val_loss=" in proc.stdout
    for tid, r in table.items():  # one console line per trial end, with its status
        assert any(line.split()[2:4] == [r["status"], tid] for line in proc.stdout.splitlines()
                   if line.startswith("[")), (tid, proc.stdout)
        summary = json.loads((results / "trials" / tid / "summary.json").read_text())
        assert summary["status"] == r["status"] and summary["config"]["train.lr"] == float(r["train.lr"])
        assert (results / "trials" / tid / "metrics.jsonl").read_text().strip()
    # --max-concurrent 1 on 2 CPUs: no two trials ran at the same time.
    spans = sorted((s["started_at"], s["ended_at"]) for s in (
        json.loads((results / "trials" / tid / "summary.json").read_text()) for tid in table))
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans

    # Optuna: COMPLETE with the value, PRUNED for the ASHA stop (not COMPLETE with a truncated value), and an OOM
    # COMPLETE with its memory constraint violated (a neutral value: the worst feasible one), so TPE models it.
    import optuna

    study = optuna.load_study(study_name="asha-e2e", storage=f"sqlite:///{results / 'optuna.db'}")
    state = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert set(state) == set(table)
    assert state[best_id].state == optuna.trial.TrialState.COMPLETE
    assert state[best_id].value == pytest.approx(float(table[best_id]["val_loss"]))
    pruned_id = by_point[(1e-5, 8)]["trial_id"]
    assert state[pruned_id].state == optuna.trial.TrialState.PRUNED and state[pruned_id].value is None
    assert state[best_id].constraints["memory_gib"] < 0  # it fit under the 0.75 GiB limit
    for point in ((3e-3, 1024), (1e-5, 1024)):
        t = state[by_point[point]["trial_id"]]
        assert t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["status"] == "oom"
        assert t.constraints["memory_gib"] > 0 and t.value == state[best_id].value

    # W&B: offline (no key in the test env), one run per trial, in the sweep's group. A run that ended
    # (ok, oom) is complete; the ASHA-stopped one was cut off with its trial process (Tune kills it).
    runs = sorted((results / "wandb").glob("offline-run-*"))
    assert len(runs) == 4
    from lmtune.sweep.trainable import wandb_run_id

    # Run ids are the trials' (a retried or resumed trial continues its run).
    assert {run.name.split("-", 3)[-1] for run in runs} == {wandb_run_id(results.name, t) for t in table}
    complete = [run for run in runs if results.name.encode() in b"".join(p.read_bytes() for p in run.glob("*.wandb"))]
    assert len(complete) >= 3

    # Tune's TensorBoard logs are in the results directory too, and the viewers the sweep names open them.
    assert list((results / "tune").rglob("events.out.tfevents.*"))
    viewers = next(line for line in proc.stdout.splitlines() if "TensorBoard: " in line)
    dashboard = viewers.split("optuna.db: ", 1)[1].split(";", 1)[0].split()
    tensorboard = viewers.split("TensorBoard: ", 1)[1].split()
    inspect = subprocess.run([*tensorboard, "--inspect"], capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0 and "val_loss" in inspect.stdout, inspect.stdout[-2000:] + inspect.stderr[-2000:]
    assert_dashboard_serves(dashboard, "asha-e2e", tmp_path)
    assert (results / "sweep.json").is_file() and json.loads((results / "sweep.json").read_text())["group"] == results.name


def assert_dashboard_serves(command: list[str], study: str, cwd: Path) -> None:
    """Start the optuna-dashboard command the sweep printed and read the study's name from its API."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([*command, "--port", str(port), "--host", "127.0.0.1"], cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        end, body = time.time() + 60, ""
        while time.time() < end and server.poll() is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.3)
        assert study in body, (server.poll(), body[:500])
    finally:
        server.kill()
        server.wait()


def assert_ray_dashboard_shows_a_trial(ray_line: str) -> None:
    """The dashboard URL on the sweep's first line serves, with the token `ray get-auth-token` prints, the running
    trial's actor under its name (``lmtune trial <id>``), as the README says to look for it."""
    import urllib.request

    assert ray_line.startswith("ray: embedded local Ray") and "dashboard http://" in ray_line, ray_line
    url = ray_line.split("dashboard ", 1)[1].split()[0]
    got = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token"], capture_output=True,
                         text=True, timeout=60)
    assert got.returncode == 0, got.stderr[-2000:]
    request = urllib.request.Request(f"{url}/api/v0/actors?detail=1&limit=100",
                                     headers={"Authorization": f"Bearer {got.stdout.strip().splitlines()[-1]}"})
    end, names = time.time() + 60, []
    while time.time() < end:
        actors = json.loads(urllib.request.urlopen(request, timeout=10).read())["data"]["result"]["result"]
        names = [a.get("repr_name") or "" for a in actors if a["state"] == "ALIVE"]
        if any(n.startswith("lmtune trial ") for n in names):
            return
        time.sleep(0.5)
    raise AssertionError(f"no live 'lmtune trial <id>' actor on the dashboard at {url}: {names}")


def _interrupt(proc: subprocess.Popen, ready, sig: int, *, first_line=None) -> str:
    """Send ``sig`` to a running sweep once ``ready()``; its whole output. ``first_line``: a check of its first line,
    made at once. The process is killed if it outlives this (a failed check, a stop that did not stop it)."""
    try:
        first = proc.stdout.readline() if first_line else ""
        if first_line:
            first_line(first)
        _wait_for(ready, 300, proc)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
        return first + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def sweep_storage(tmp_path, monkeypatch):
    """``--storage`` for a sweep run from ``tmp_path``: an S3 URI (a local S3 server), the driver's own files under
    ``tmp_path/results``. Yields (argument, S3 client). (A local directory is the storage of every other e2e test,
    killed and resumed at many more points in test_resume_anywhere.py.)"""
    import boto3

    from tests.s3 import CREDENTIALS, local_s3

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with local_s3("lmtune") as endpoint:
        client = boto3.client("s3", endpoint_url=f"http://{endpoint}")
        yield f"s3://lmtune/sweeps?endpoint_override={endpoint}&scheme=http", client


def s3_keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="lmtune", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_sigkilled_driver_resumes_without_rerunning_finished_trials(tmp_path, sweep_storage):
    f = sweep_file(tmp_path, """
        sweep = Sweep(
            name="resume-e2e",
            base={**TINY_CPU, "train.steps": 100, "train.log_interval": 5, "train.eval_interval": 10},
            space={"train.lr": grid([3e-3, 1e-3, 2e-3])},
            metric="val_loss", mode="min", export=["train.lr"],
        )
    """)
    storage_arg, s3 = sweep_storage
    storage = tmp_path / "results"
    args = [sys.executable, "-m", "lmtune.sweep", str(f), "--storage", storage_arg, "--max-concurrent", "1",
            "--no-wandb", "--no-report", "--no-dashboard"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        def second_trial_past_two_checkpoints() -> bool:
            # The driver writes trials/{id}/metrics.jsonl as results arrive, and snapshots the experiment
            # soon after each trial start and registered checkpoint (within 19× a snapshot's own duration,
            # a few ms for this sweep): by a step-30 report the step-10 checkpoint is in the snapshot.
            if not storage.exists() or not any(p.is_dir() for p in storage.iterdir()):
                return False
            results = only_run(storage)
            done = rows(results) if (results / "trials.csv").exists() else {}
            if len(done) != 1:
                return False
            for m in (results / "trials").glob("*/metrics.jsonl"):
                if m.parent.name not in done and any(json.loads(line).get("step", 0) >= 30 for line in m.open()):
                    return True
            return False

        _wait_for(second_trial_past_two_checkpoints, 400, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, as if the machine went away
        proc.wait()
    results = only_run(storage)
    finished = rows(results)
    assert len(finished) == 1
    first_id = next(iter(finished))
    first_lines = (results / "trials" / first_id / "metrics.jsonl").read_text().splitlines()
    interrupted = next(m.parent.name for m in (results / "trials").glob("*/metrics.jsonl") if m.parent.name != first_id)
    before = (results / "trials" / interrupted / "metrics.jsonl").read_text().splitlines()

    again = run_module("lmtune.sweep", str(f), "--storage", storage_arg, "--resume", "--no-wandb", "--no-report",
                       "--no-dashboard", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert only_run(storage) == results  # the same results directory, continued
    table = rows(results)
    assert len(table) == 3 and all(r["status"] == "ok" for r in table.values()), (
        {t: (r["status"], r.get("error")) for t, r in table.items()}, again.stdout[-4000:])
    # The finished trial did not run again; the interrupted one continued under its own id (no new trial
    # for its point) from a checkpoint, not from scratch.
    assert (results / "trials" / first_id / "metrics.jsonl").read_text().splitlines() == first_lines
    assert f"start    {first_id}" not in again.stdout
    assert interrupted in table and {p.name for p in (results / "trials").iterdir()} == set(table)
    after = (results / "trials" / interrupted / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in before if json.loads(line)["step"] <= 10]
    assert after[: len(kept)] == kept  # the reports up to the checkpoint are the first attempt's, untouched
    # Reports the first attempt made past its last snapshotted checkpoint were replaced by the resumed run's:
    # the file reads as one uninterrupted run, the same report sequence as the trial that was never stopped.
    def sequence(lines):
        return [(json.loads(line)["step"], "val_loss" in json.loads(line)) for line in lines]

    assert sequence(after) == sequence(first_lines)
    assert json.loads(after[-1])["status"] == "ok"
    summary = json.loads((results / "trials" / interrupted / "summary.json").read_text())
    assert summary["step"] == 100
    if s3 is not None:  # Tune's state and the checkpoints lived in the bucket; the driver's files joined them
        assert not (results / "tune").exists()
        keys = s3_keys(s3, f"sweeps/{results.name}/")
        assert any(k.startswith(f"sweeps/{results.name}/tune/experiment_state-") for k in keys)
        assert any(k.startswith(f"sweeps/{results.name}/tune/{interrupted}/checkpoint_") for k in keys)
        assert f"sweeps/{results.name}/trials.csv" in keys and f"sweeps/{results.name}/optuna.db" in keys


def two_trials(tmp_path: Path, name: str, *, steps: int) -> Path:
    """A sweep of two tiny trials (two learning rates) that report every 5 steps and checkpoint every 10: one to stop
    mid-run, one to finish after the resume."""
    return sweep_file(tmp_path, f"""
        sweep = Sweep(
            name="{name}",
            base={{**TINY_CPU, "train.steps": {steps}, "train.log_interval": 5, "train.eval_interval": 10}},
            space={{"train.lr": grid([3e-3, 1e-3])}},
            metric="val_loss", mode="min", export=["train.lr"],
        )
    """)


def test_ctrl_c_and_sigterm_stop_the_sweep_with_its_state_saved_and_resumes_continue_it(tmp_path):
    """One sweep of two trials, stopped twice and resumed (one sweep: each fresh one costs a driver, a Ray and a trial
    process):

    1. Ctrl-C once a trial reports: exit 130, the --resume line, no traceback; the first line's dashboard shows the
       running trial.
    2. A resume whose saved searcher state Tune cannot restore: refused in one line, nothing changed, no trial ran.
    3. A resume after a driver died while Tune rewrote tuner.pkl (left empty): lmtune's copy is put back. This resume
       runs under coreutils' ``timeout``, which leads a process group of its own and relays a SIGTERM it gets to the
       driver and to that group, as a batch system stops a job: the sweep stops as Ctrl-C stops it (state saved, the
       --resume line, exit 143), without Ray's stack lines. (Before, the GCS in the same group died of the signal and
       the driver hung 60 s on it before Ray ended it, with no state saved and no hint.)
    4. The resume to the end: the stopped trial goes on from its checkpoint under its own id, and its line says from
       which step; each trial's reports read as one uninterrupted run.
    5. A --resume of the finished run: its table, without starting Ray (~10 s)."""
    f = two_trials(tmp_path, "stops", steps=200)
    storage = tmp_path / "results"
    quiet = ["--storage", str(storage), "--max-concurrent", "1", "--no-wandb", "--no-report"]
    args = [*quiet, "--no-dashboard"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # 1. what Ctrl-C sends, once a trial reports; first the Ray line: where the dashboard of this (default) run is,
    # which shows the trial while it runs
    proc = subprocess.Popen([sys.executable, "-m", "lmtune.sweep", str(f), *quiet], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _interrupt(proc, lambda: any(storage.glob("*/trials/*/metrics.jsonl")), signal.SIGINT,
                     first_line=assert_ray_dashboard_shows_a_trial)
    assert proc.returncode == 130, out
    assert "interrupted:" in out and f"python -m lmtune.sweep {f} {' '.join(quiet)} --resume" in out, out
    assert "Traceback" not in out and "ResourceWarning" not in out, out
    results = only_run(storage)
    tune_dir = results / "tune"
    # 2. A snapshot Tune cannot restore (here a whole pickle of the wrong thing in place of the searcher's state):
    # Tune would log it and start the sweep over; the resume stops instead, says so in one line, changes nothing.
    (searcher,) = tune_dir.glob("searcher-state-*.pkl")
    saved, before = searcher.read_bytes(), sorted(p.name for p in tune_dir.iterdir())
    searcher.write_bytes(pickle.dumps("not a searcher's state"))
    refused = run_module("lmtune.sweep", str(f), *args, "--resume", cwd=tmp_path, timeout=600)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "Tune could not restore the sweep's saved state" in line and "without --resume" in line, line
    assert sorted(p.name for p in tune_dir.iterdir() if not p.name.endswith(".lmtune-failed-resume")) == before
    assert "start " not in refused.stdout, refused.stdout  # no trial ran
    searcher.write_bytes(saved)
    # 3. tuner.pkl cut short, and the resume stopped by SIGTERM (to `timeout`, which relays it) past a checkpoint
    (tune_dir / "tuner.pkl").write_bytes(b"")
    proc = subprocess.Popen(["timeout", "600", sys.executable, "-m", "lmtune.sweep", str(f), *args, "--resume"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def past_a_checkpoint() -> bool:
        return any(json.loads(line).get("step", 0) >= 20
                   for m in storage.glob("*/trials/*/metrics.jsonl") for line in m.read_text().splitlines())

    out = _interrupt(proc, past_a_checkpoint, signal.SIGTERM)
    assert "resume: tuner.pkl was cut short by the interruption (EOFError" in out, out
    assert proc.returncode == 143, out
    assert "interrupted by SIGTERM:" in out and f"python -m lmtune.sweep {f} {' '.join(args)} --resume" in out, out
    assert "SIGTERM received" not in out and "Traceback" not in out and "GCS" not in out, out
    assert not (results / "trials.csv").exists() or not rows(results)  # the first trial was stopped, not ended
    (stopped,) = [p.name for p in (results / "trials").iterdir()]
    # 4. to the end
    again = run_module("lmtune.sweep", str(f), *args, "--resume", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    table = rows(results)
    assert len(table) == 2 and all(r["status"] == "ok" for r in table.values()), table
    summary = json.loads((results / "trials" / stopped / "summary.json").read_text())
    assert summary["step"] == 200 and summary["resumed_from_step"] >= 10, summary  # from its checkpoint, own id
    # its line says where it goes on from, not "start"
    assert f"resume   {stopped}  from step {summary['resumed_from_step']} (its last checkpoint)" in again.stdout, again.stdout
    assert f"start    {stopped}" not in again.stdout

    def sequence(tid):
        lines = (results / "trials" / tid / "metrics.jsonl").read_text().splitlines()
        return [(json.loads(line)["step"], "val_loss" in json.loads(line)) for line in lines]

    (other,) = set(table) - {stopped}
    assert sequence(stopped) == sequence(other)  # one uninterrupted run's reports, as the trial never stopped
    # 5. A --resume of the finished run has nothing to continue: its table, without starting Ray.
    done = run_module("lmtune.sweep", str(f), *args, "--resume", cwd=tmp_path, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith(f"resume: {results} finished at ") and "Ray not started" in done.stdout, done.stdout
    assert "ray: " not in done.stdout and f"{other}  ok" in done.stdout and rows(results) == table


def test_trial_killed_by_rays_memory_monitor_is_oom_and_not_trained_again(tmp_path):
    """Fault injection: a memory-usage threshold of 1% makes Ray's memory monitor kill trial processes. Two trials
    at once: the first kill lands while the other trial runs on the node, which says nothing about that trial's
    config (the monitor kills the newest task): it is host_oom, retried, and concurrency drops to one. A kill of a
    trial alone on its node is oom, and its retry does not train."""
    f = sweep_file(tmp_path, """
        sweep = Sweep(name="mm-e2e", base={**TINY_CPU, "train.steps": 400}, space={"train.lr": grid([1e-3, 2e-3])},
                      max_failures=1, export=["train.lr"])
    """)
    storage = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_memory_usage_threshold": "0.01",
           "RAY_memory_monitor_refresh_ms": "100"}
    proc = subprocess.run([sys.executable, "-m", "lmtune.sweep", str(f), "--storage", str(storage), "--no-wandb",
                           "--no-report", "--no-dashboard", "--max-concurrent", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = only_run(storage)
    table = rows(results)
    statuses = sorted(r["status"] for r in table.values())
    assert len(table) == 2 and set(statuses) <= {"oom", "host_oom"} and "oom" in statuses, table
    assert all("low on memory" in r["error"] for r in table.values()), table
    host = [line for line in proc.stdout.splitlines() if "host memory: Ray's memory monitor killed it while" in line]
    assert host and "not evidence about its config; at most 1 trial(s) at once from now on" in host[0]
    assert "retrying from its last checkpoint" in host[0]
    assert all(not r["tokens"] for r in table.values())  # no step of training was recorded as a result
    counts = f"2 trial(s): {statuses.count('host_oom')} host_oom, " if "host_oom" in statuses else "2 trial(s): 2 oom"
    assert counts in proc.stdout
    import optuna  # a host-memory kill is no evidence about the config: never told to the study as infeasible

    study = optuna.load_study(study_name="mm-e2e", storage=f"sqlite:///{results / 'optuna.db'}")
    for t in study.trials:
        if t.user_attrs.get("status") == "host_oom":
            assert t.state.name == "FAIL" and not t.constraints
    assert "Traceback" not in proc.stdout + proc.stderr  # Ray's error dumps went to logs/
    assert "OutOfMemoryError" in (results / "logs" / "driver.log").read_text()
