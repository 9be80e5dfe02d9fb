"""The cluster path on one machine: a real two-node Ray cluster (``ray start`` head + worker, one CPU each,
token authentication as ``ray up`` sets it), sweeps through ``--address``, a node lost mid-trial, and the
embedded Ray next to a running cluster and after a killed one.

One cluster for the module (``ray start`` costs ~10 s a node), in this order: the first two tests leave it as
they found it, the node-loss test takes its worker away, the last one kills the rest.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
# What Ray's own logging looks like (C++ glog lines, Python log records, forwarded worker lines): never on the
# sweep's console, which is one line per trial event (the logs are in the results directory's logs/).
RAY_LOG_LINE = re.compile(r"\.cc:\d+\]|\((raylet|pid=\d+|gcs_server)|^\d{4}-\d\d-\d\d[ T]\d\d:\d\d|^\[\d{4}-\d\d-\d\d"
                          r"|\b(INFO|WARNING)\b .*\.py:\d+")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _cmdlines() -> dict[int, str]:
    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            out[p.info["pid"]] = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            pass
    return out


class Cluster:
    def __init__(self, tmp: Path):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.tmp = tmp
        self.session = ""

    def start(self) -> None:
        self._ray("start", "--head", f"--port={self.port}", "--num-cpus=1", "--include-dashboard=false",
                  "--disable-usage-stats")
        gcs = [cmd for cmd in _cmdlines().values() if "gcs_server" in cmd and f"--gcs_server_port={self.port}" in cmd]
        self.session = re.search(r"--session-name=(\S+)", gcs[0]).group(1)
        self.head_id = self._node_ids()[0]
        self._ray("start", f"--address={self.address}", "--num-cpus=1", "--disable-usage-stats")
        ids = self._node_ids()
        assert len(ids) == 2, ids
        self.worker_id = next(i for i in ids if i != self.head_id)

    def _ray(self, *args: str) -> None:
        proc = subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def _node_ids(self, alive: bool = True) -> list[str]:
        code = ("import json, ray; ray.init(address=%r, log_to_driver=False, configure_logging=False); "
                "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] or not %r]))") % (self.address, alive)
        proc = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def kill_worker_node(self) -> None:
        """The worker node's host going away: its raylet and every process of it, SIGKILLed."""
        raylet = [pid for pid, cmd in _cmdlines().items() if "raylet/raylet" in cmd and self.worker_id in cmd]
        assert len(raylet) == 1, raylet
        node = psutil.Process(raylet[0])
        for p in [node, *node.children(recursive=True)]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass

    def processes(self) -> list[int]:
        """This cluster's processes (they name its session) and theirs (the dashboard's workers do not)."""
        mine = [pid for pid, cmd in _cmdlines().items() if self.session and self.session in cmd]
        out = set(mine)
        for pid in mine:
            try:
                out.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                pass
        return sorted(out)

    def kill_all(self) -> None:
        """Every process of the cluster SIGKILLed, as a crash would leave it: no `ray stop`, its address file stays."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")  # where `ray start` records the latest cluster's address


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    before = ADDRESS_FILE.read_text() if ADDRESS_FILE.is_file() else None
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.kill_all()
        # leave the machine's Ray address as it was (a plain ray.init() elsewhere would try the dead cluster)
        if before is None:
            ADDRESS_FILE.unlink(missing_ok=True)
        else:
            ADDRESS_FILE.write_text(before)


def _sweep(tmp: Path, body: str) -> Path:
    f = tmp / "sweep.py"
    f.write_text("from lmtune.sweep import TINY_CPU, Sweep, grid\n" + textwrap.dedent(body))
    return f


def _rows(storage: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    (results,) = [p for p in storage.iterdir() if p.is_dir()]
    with open(results / "trials.csv", newline="") as f:
        return results, {r["trial_id"]: r for r in csv.DictReader(f)}


def _no_ray_lines(text: str) -> None:
    noisy = [line for line in text.splitlines() if RAY_LOG_LINE.search(line)]
    assert not noisy, noisy[:10]


def test_embedded_ray_is_its_own_next_to_a_running_cluster(cluster, tmp_path):
    f = _sweep(tmp_path, """
        sweep = Sweep(name="embedded", base={**TINY_CPU, "train.steps": 10, "train.eval_interval": 10},
                      space={"train.lr": grid([1e-3])}, metric="val_loss", export=["train.lr"])
    """)
    # RAY_ADDRESS names the cluster too: an embedded sweep still does not join it
    proc = subprocess.run([sys.executable, "-m", "lmtune.sweep", str(f), "--storage", str(tmp_path / "r"), "--no-wandb",
                           "--no-report"], cwd=tmp_path, env={**_env(), "RAY_ADDRESS": cluster.address},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith("ray: embedded local Ray (a new instance; not the Ray cluster") and cluster.address in first
    _, table = _rows(tmp_path / "r")
    (row,) = table.values()
    assert row["status"] == "ok" and row["node_id"] not in (cluster.head_id, cluster.worker_id)
    assert sorted(cluster._node_ids()) == sorted([cluster.head_id, cluster.worker_id])  # the cluster is untouched


def test_a_sweep_through_address_runs_trials_on_both_nodes_into_shared_storage(cluster, tmp_path):
    f = _sweep(tmp_path, """
        sweep = Sweep(name="two-nodes", base={**TINY_CPU, "train.steps": 40, "train.eval_interval": 10},
                      space={"train.lr": grid([3e-3, 1e-3])}, metric="val_loss", export=["train.lr"])
    """)
    storage = tmp_path / "shared"
    proc = subprocess.run([sys.executable, "-m", "lmtune.sweep", str(f), "--address", cluster.address, "--storage",
                           str(storage), "--max-concurrent", "2", "--no-wandb"], cwd=tmp_path, env=cluster.env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith(f"ray: joined the cluster at ") and str(cluster.port) in proc.stdout.splitlines()[0]
    results, table = _rows(storage)
    assert {r["status"] for r in table.values()} == {"ok"}
    assert {r["node_id"] for r in table.values()} == {cluster.head_id, cluster.worker_id}  # one trial per node
    for tid in table:  # checkpoints and results of both nodes' trials in the storage they share
        assert list((results / "tune" / tid).glob("checkpoint_*")), tid
        assert json.loads((results / "trials" / tid / "summary.json").read_text())["status"] == "ok"
    page = (results / "report.html").read_text()
    assert all(f"ran on node {table[t]['node_ip']} {table[t]['node_id'][:8]}" in page for t in table)
    _no_ray_lines(proc.stdout + proc.stderr)


def test_a_node_lost_mid_trial_its_trial_continues_on_the_other_from_its_checkpoint(cluster, tmp_path):
    """Takes the worker node away. Both trials train the same model (log_interval differs only in
    how often it reports), so the interrupted one must end with the uninterrupted one's exact val_loss."""
    f = _sweep(tmp_path, """
        sweep = Sweep(name="node-loss", base={**TINY_CPU, "train.steps": 1500, "train.eval_interval": 100},
                      space={"train.log_interval": grid([5, 10])}, metric="val_loss", export=["train.lr"])
    """)
    storage = tmp_path / "shared"
    proc = subprocess.Popen([sys.executable, "-m", "lmtune.sweep", str(f), "--address", cluster.address, "--storage",
                             str(storage), "--max-concurrent", "2", "--no-wandb", "--no-report"], cwd=tmp_path,
                            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim, end = None, time.time() + 240
        while victim is None and time.time() < end and proc.poll() is None:
            time.sleep(0.2)
            for m in storage.glob("*/trials/*/metrics.jsonl"):
                reports = [json.loads(line) for line in m.read_text().splitlines() if line.strip()]
                attempts = m.parent / "attempts.jsonl"  # where each attempt runs, from its first report
                where = [json.loads(line) for line in attempts.read_text().splitlines()] if attempts.is_file() else []
                if where and where[-1]["node_id"] == cluster.worker_id and reports[-1].get("step", 0) >= 200:
                    victim = m.parent.name
        assert victim is not None, "no trial reached step 200 on the worker node"
        assert not (storage.glob("*/trials/" + victim + "/summary.json") and list(
            storage.glob("*/trials/" + victim + "/summary.json"))), "the trial ended before its node was killed"
        cluster.kill_worker_node()
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert f"failed   {victim}  retrying from its last checkpoint" in out, out[-3000:]
    results, table = _rows(storage)
    assert len(table) == 2 and {r["status"] for r in table.values()} == {"ok"}, table
    assert table[victim]["node_id"] == cluster.head_id  # it finished on the node that was left
    attempts = [json.loads(line) for line in (results / "trials" / victim / "attempts.jsonl").read_text().splitlines()]
    assert [a["node_id"] for a in attempts] == [cluster.worker_id, cluster.head_id], attempts
    other = next(t for t in table if t != victim)
    summary = json.loads((results / "trials" / victim / "summary.json").read_text())
    assert summary["step"] == 1500 and summary["resumed_from_step"] >= 100  # from a checkpoint, not from step 0
    assert float(table[victim]["val_loss"]) == float(table[other]["val_loss"])
    # one uninterrupted stream of reports: each (step, kind) once, in order, no step missing around the loss
    reports = [json.loads(line) for line in (results / "trials" / victim / "metrics.jsonl").read_text().splitlines()]
    pairs = [(r["step"], "val_loss" in r) for r in reports]
    assert pairs == sorted(set(pairs)) and pairs[-1][0] == 1500
    every = int(table[victim]["train.log_interval"])
    assert {r["step"] for r in reports if "loss" in r and r["step"] < 1500} == set(range(every, 1500, every))
    _no_ray_lines(out + err)


def test_a_killed_clusters_leftover_address_does_not_stall_an_embedded_sweep(cluster, tmp_path):
    """After the cluster's processes are SIGKILLed (no `ray stop`), its address file is still there."""
    cluster.kill_all()
    time.sleep(1)
    assert not cluster.processes()
    f = _sweep(tmp_path, """
        sweep = Sweep(name="after-crash", base={**TINY_CPU, "train.steps": 10, "train.eval_interval": 10},
                      space={"train.lr": grid([1e-3])}, metric="val_loss", export=["train.lr"])
    """)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "lmtune.sweep", str(f), "--storage", str(tmp_path / "r"), "--no-wandb",
                           "--no-report"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith("ray: embedded local Ray (a new instance") and f":{cluster.port}" not in first
    assert time.time() - t0 < 120
