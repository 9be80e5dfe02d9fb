"""A sweep on a real Slurm: Debian's slurm-wlm and munge, a controller and two slurmd (two nodes) on this machine,
started by the test in a directory of its own (its own munge socket and key, its own ports) and torn down after.

Where Slurm is not installed (`apt-get install slurm-wlm munge` as root; .ci/run does it) the tests say so and skip.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_module
from tests.helpers import wait_for

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")
needs_slurm = pytest.mark.skipif(any(shutil.which(d) is None for d in DAEMONS) or os.geteuid() != 0,
                                 reason="no Slurm here: `apt-get install slurm-wlm munge` as root makes these run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A two-node Slurm on this machine (nodes n1, n2 of 1 CPU each, partition `debug`); SLURM_CONF set."""
    root = tmp_path_factory.mktemp("slurm")
    for d in ("munge", "state", "spool", "log"):
        (root / d).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.sock"
    subprocess.run(["munged", "-f", f"--key-file={key}", f"--socket={sock}", f"--log-file={root}/log/munged.log",
                    f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/seed"], check=True)
    host = socket.gethostname()
    ctl, n1, n2 = _free_port(), _free_port(), _free_port()
    conf = root / "slurm.conf"
    conf.write_text(textwrap.dedent(f"""\
        ClusterName=lmtune-test
        SlurmctldHost={host}
        SlurmUser=root
        SlurmdUser=root
        AuthType=auth/munge
        AuthInfo=socket={sock}
        CredType=cred/munge
        StateSaveLocation={root}/state
        SlurmdSpoolDir={root}/spool/%n
        SlurmctldPidFile={root}/slurmctld.pid
        SlurmdPidFile={root}/slurmd-%n.pid
        SlurmctldLogFile={root}/log/slurmctld.log
        SlurmdLogFile={root}/log/slurmd-%n.log
        SlurmctldPort={ctl}
        ProctrackType=proctrack/linuxproc
        TaskPlugin=task/none
        SelectType=select/cons_tres
        SelectTypeParameters=CR_Core
        ReturnToService=2
        MpiDefault=none
        JobAcctGatherType=jobacct_gather/none
        KillWait=30
        NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1} CPUs=1 RealMemory=8000 State=UNKNOWN
        NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2} CPUs=1 RealMemory=8000 State=UNKNOWN
        PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
    """))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    os.environ["SLURM_CONF"] = str(conf)
    subprocess.run(["slurmctld", "-f", str(conf), "-i"], check=True, env=env)
    for node in ("n1", "n2"):
        subprocess.run(["slurmd", "-f", str(conf), "-N", node], check=True, env=env)
    deadline = time.monotonic() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T %D"], capture_output=True, text=True, env=env).stdout:
        assert time.monotonic() < deadline, (root / "log" / "slurmctld.log").read_text()[-2000:]
        time.sleep(0.5)
    try:
        yield root
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        time.sleep(1)
        for pidfile in [root / "slurmd-n1.pid", root / "slurmd-n2.pid", root / "slurmctld.pid"]:
            _kill(pidfile)
        subprocess.run(["munged", f"--socket={sock}", "--stop"], capture_output=True)
        del os.environ["SLURM_CONF"]
        subprocess.run(["pkill", "-f", "temp-dir=/tmp/ray-"], capture_output=True)  # none should be left: belt


def _kill(pidfile: Path) -> None:
    try:
        os.kill(int(pidfile.read_text()), 15)
    except (OSError, ValueError):
        pass


def _wait_for(path_glob: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = "".join(p.read_text(errors="replace") for p in sorted(path_glob.parent.glob(path_glob.name)))
        if text in logs:
            return logs
        time.sleep(1)
    raise AssertionError(f"{text!r} not in the job logs after {timeout:.0f} s:\n{logs[-3000:]}")


def _jobs() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())


@needs_slurm
@pytest.mark.slow
def test_a_job_signalled_ahead_of_its_time_limit_is_requeued_and_the_next_job_completes_the_sweep(slurm, tmp_path):
    """Two Slurm nodes, one Ray node each. The first job gets the signal its time limit sends ahead of the end
    (--signal=B:TERM: SIGTERM to the batch shell) once a trial has finished, and stops the sweep mid-way with its state
    saved; the job requeues itself, and the next job finishes it with --resume: one row per configuration, every
    finished trial of the first job kept, not trained again. The signal is sent as the time limit sends it
    (``scancel --signal=TERM --batch``) rather than waited for: Slurm's own comes up to a minute early (the resolution
    of its event handling), before any trial has finished on a loaded machine."""
    sweep = tmp_path / "long.py"
    sweep.write_text(textwrap.dedent("""
        from lmtune.sweep import TINY_CPU, Sweep, grid

        sweep = Sweep(name="slurm-long", base={**TINY_CPU, "train.steps": 150, "train.eval_interval": 50},
                      space={"train.seed": grid(list(range(5)))}, metric="val_loss", mode="min")
    """))
    storage = tmp_path / "results"
    before_jobs = _jobs()
    proc = run_module("lmtune.slurm", str(sweep), "--nodes", "2", "--time", "00:10:00", "--signal-seconds", "60",
                      "--requeue", "--no-wandb", "--storage", str(storage), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split("submitted job ")[1].split(":")[0]
    try:
        wait_for(lambda: any(r["status"] == "ok" for r in _rows(storage)), timeout=300, what="a trial finished")
        subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True)
        first = _wait_for(storage / "slurm" / "lmtune-slurm-long-*.out", "requeued as job", 200)
        (run,) = storage.glob("1-slurm-long-*")
        with open(run / "trials.csv", newline="") as f:  # read before the next job has its Ray up (~15 s)
            done_first = {r["trial_id"] for r in csv.DictReader(f) if r["status"] == "ok"}
        before = {t: (run / "trials" / t / "metrics.jsonl").read_text() for t in done_first}
        assert "SIGTERM (the time limit or a preemption is near)" in first and 0 < len(done_first) < 5, first[-3000:]
        logs = _wait_for(storage / "slurm" / "lmtune-slurm-long-*.out", "lmtune.slurm: the sweep is done", 400)
    finally:
        for left in _jobs() - before_jobs:  # a failed check leaves no job running into the next test
            subprocess.run(["scancel", left], capture_output=True)
    assert "requeued as job" in logs and "attempt 2" in logs
    with open(run / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["train.seed"]) for r in rows) == list(range(5)) and {r["status"] for r in rows} == {"ok"}
    assert len({r["node_id"] for r in rows}) >= 2  # trials ran on both Slurm nodes' Ray nodes (new ids each job)
    # a trial finished before the signal was not trained again: its reports are those of the first job, unchanged
    assert {t: (run / "trials" / t / "metrics.jsonl").read_text() for t in done_first} == before
    assert all(json.loads((run / "trials" / t / "summary.json").read_text())["step"] == 150 for t in done_first)


def _rows(storage: Path) -> list[dict[str, str]]:
    for path in storage.glob("1-slurm-long-*/trials.csv"):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return []


@needs_slurm
@pytest.mark.parametrize("args, says", [
    (["--partition", "gpu"], "partition 'gpu' does not exist; this cluster's partitions: debug"),
    (["--nodes", "3"], "--nodes 3 is more than partition 'debug' has (2 node(s): n1, n2)"),
    (["--time", "soon"], "--time soon is not accepted: expected [D-]HH:MM:SS or minutes"),
])
def test_what_slurm_would_refuse_is_one_line_before_anything_is_submitted(slurm, tmp_path, args, says):
    before = _jobs()
    proc = run_module("lmtune.slurm", str(REPO / "sweeps" / "weight_decay.py"), "--smoke", *args,
                      "--storage", str(tmp_path / "r"), cwd=tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and says in err[0], proc.stderr
    assert "JOBID" in subprocess.run(["squeue"], capture_output=True, text=True).stdout  # squeue answers
    assert _jobs() == before  # nothing was submitted


@needs_slurm
def test_dry_run_prints_a_batch_script_a_slurm_administrator_would_recognise(slurm, tmp_path):
    proc = run_module("lmtune.slurm", str(REPO / "sweeps" / "weight_decay.py"), "--smoke", "--nodes", "2",
                      "--time", "01:30:00", "--dry-run", "--sbatch=--account=lab", "--storage", str(tmp_path / "r"),
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--time=01:30:00", "--partition=debug",
                      "--signal=B:TERM@120", "--account=lab"):
        assert f"#SBATCH {directive}" in lines
    assert '"$RAY" start --head --block' in proc.stdout and '"$PY" -m lmtune.sweep' in proc.stdout
    assert subprocess.run(["bash", "-n"], input=proc.stdout, text=True).returncode == 0
    assert not (tmp_path / "r").exists()  # nothing written, nothing submitted


def test_no_slurm_on_the_machine_is_one_line(tmp_path, monkeypatch):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python, no sbatch
    proc = subprocess.run([sys.executable, "-m", "lmtune.slurm", str(REPO / "sweeps" / "weight_decay.py"), "--smoke"],
                          env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "error: no Slurm here: sbatch and sinfo are not on PATH (run this on a Slurm login node)."


def test_storage_that_other_nodes_cannot_see_is_refused_for_several_nodes(monkeypatch):
    from lmtune import slurm

    monkeypatch.setattr(slurm, "_partitions", lambda: {"gpu": ["g1", "g2"]})
    monkeypatch.setattr(slurm, "_default_partition", lambda: "gpu")
    monkeypatch.setattr(slurm, "_node_addresses", lambda nodes: {"10.0.0.1", "10.0.0.2"})
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    args = slurm._parser().parse_args(["s.py", "--nodes", "2", "--storage", "/tmp/results"])
    with pytest.raises(slurm.ConfigError, match=r"--storage /tmp/results is on a \w+ filesystem, which the other nodes"):
        slurm.check(args, None)
    monkeypatch.setattr(slurm, "filesystem_type", lambda path: "nfs4")
    assert slurm.check(args, None) == "gpu"
    args = slurm._parser().parse_args(["s.py", "--nodes", "2", "--storage", "s3://bucket/results"])
    assert slurm.check(args, None) == "gpu"
