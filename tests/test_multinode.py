"""The cluster path on one machine: a real two-node Ray cluster (``ray start`` head + worker, one CPU each,
token authentication as ``ray up`` sets it), sweeps through ``--address``, a node lost mid-trial, and the
embedded Ray next to a running cluster and after a killed one.

One cluster for the module (``ray start`` costs ~10 s a node), in this order: the first two tests leave it as
they found it, the multi-worker node-loss test adds a node and takes that one away, the single-worker node-loss
test takes the worker away, the last one kills the rest.
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

from tests.conftest import REPO, train_like
from tests.helpers import wait_for

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

    def add_node(self, cpus: int) -> str:
        """One more worker node (``ray start --address``); its node id."""
        before = set(self._node_ids())
        self._ray("start", f"--address={self.address}", f"--num-cpus={cpus}", "--disable-usage-stats")
        (new,) = set(self._node_ids()) - before
        return new

    def kill_worker_node(self, node_id: str | None = None) -> None:
        """A worker node's host going away (the fixture's worker unless told another): its raylet and every
        process of it, SIGKILLed."""
        node_id = node_id or self.worker_id
        raylet = [pid for pid, cmd in _cmdlines().items() if "raylet/raylet" in cmd and node_id in cmd]
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


EMBEDDED = textwrap.dedent("""
    import json, pathlib, sys, time, ray
    from lmtune.sweep.cluster import prepare_env, start_ray
    pathlib.Path(sys.argv[1]).mkdir()
    dashboard = sys.argv[2] == "dashboard"
    t0 = time.time()
    start_ray(None, prepare_env(embedded=True, dashboard=dashboard), pathlib.Path(sys.argv[1]), sys.stdout,
              dashboard=dashboard)

    @ray.remote(num_cpus=0)
    def ask():
        from ray.util.state import list_nodes
        return [n.node_id for n in list_nodes(timeout=20)] if dashboard else []

    print("state api:", json.dumps(ray.get(ask.remote())))
    print("nodes:", json.dumps([n["NodeID"] for n in ray.nodes()]))
    print(f"took {time.time() - t0:.0f} s")
""")
"""A sweep's driver's start of its embedded Ray (lmtune's own ``start_ray``, dashboard or not), then what the
instance is made of: its nodes, and what Ray's state API inside it answers (the question Ray Train's
placement-group cleaner asks at the end of every multi-worker trial)."""


def _embedded_start(tmp_path: Path, env: dict[str, str], dashboard: bool) -> tuple[str, dict]:
    proc = subprocess.run([sys.executable, "-c", EMBEDDED, str(tmp_path / "logs"), "dashboard" if dashboard else "-"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    said = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in lines[1:] if ": " in line}
    return lines[0], {"state api": json.loads(said["state api"]), "nodes": json.loads(said["nodes"]),
                      "took": int(lines[-1].split()[1])}


def test_embedded_ray_is_its_own_next_to_a_running_cluster(cluster, tmp_path):
    """RAY_ADDRESS names the cluster too: the embedded Ray a sweep starts still does not join it, and its first
    line names the cluster it did not join."""
    first, got = _embedded_start(tmp_path, {**_env(), "RAY_ADDRESS": cluster.address}, dashboard=False)
    assert first.startswith("ray: embedded local Ray (a new instance; not the Ray cluster") and cluster.address in first
    assert first.endswith("dashboard off (--no-dashboard)"), first
    (node,) = got["nodes"]
    assert node not in (cluster.head_id, cluster.worker_id)
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
    assert proc.stdout.startswith("ray: joined the cluster at ") and str(cluster.port) in proc.stdout.splitlines()[0]
    results, table = _rows(storage)
    assert {r["status"] for r in table.values()} == {"ok"}
    assert {r["node_id"] for r in table.values()} == {cluster.head_id, cluster.worker_id}  # one trial per node
    for tid in table:  # checkpoints and results of both nodes' trials in the storage they share
        assert list((results / "tune" / tid).glob("checkpoint_*")), tid
        assert json.loads((results / "trials" / tid / "summary.json").read_text())["status"] == "ok"
    page = (results / "report.html").read_text()
    assert all(f"ran on node {table[t]['node_ip']} {table[t]['node_id'][:8]}" in page for t in table)
    _no_ray_lines(proc.stdout + proc.stderr)


def _reports(results: Path, tid: str) -> list[dict]:
    return [json.loads(line) for line in (results / "trials" / tid / "metrics.jsonl").read_text().splitlines()]


def _attempts(trial_dir: Path) -> list[dict]:
    """Where each attempt of a trial ran (rank 0's node for a multi-worker trial), from its first report."""
    path = trial_dir / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _sweep_losing_a_node(cluster: Cluster, tmp_path: Path, body: str, node_id: str, ready,
                         trials: int = 2) -> tuple[Path, dict, str]:
    """Run ``body`` through ``--address``; once a trial whose latest attempt runs on ``node_id`` is ``ready``
    (its reports so far), that node is killed. The sweep must complete, say that it retried the trial, and keep
    Ray's log lines off its console. Returns (results directory, trials.csv rows, the trial that lost its node)."""
    f = _sweep(tmp_path, body)
    storage = tmp_path / "shared"
    proc = subprocess.Popen([sys.executable, "-m", "lmtune.sweep", str(f), "--address", cluster.address, "--storage",
                             str(storage), "--max-concurrent", "2", "--no-wandb", "--no-report"], cwd=tmp_path,
                            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim, end = None, time.time() + 300
        while victim is None and time.time() < end and proc.poll() is None:
            time.sleep(0.2)
            for m in storage.glob("*/trials/*/metrics.jsonl"):
                where = _attempts(m.parent)
                reports = [json.loads(line) for line in m.read_text().splitlines() if line.strip()]
                if where and where[-1]["node_id"] == node_id and ready(reports):
                    victim = m.parent.name
        assert victim is not None, "no trial got far enough on the node to be killed"
        assert not list(storage.glob(f"*/trials/{victim}/summary.json")), "the trial ended before its node was killed"
        cluster.kill_worker_node(node_id)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert f"failed   {victim}  retrying from its last checkpoint" in out, out[-3000:]
    _no_ray_lines(out + err)
    results, table = _rows(storage)
    assert len(table) == trials and {r["status"] for r in table.values()} == {"ok"}, table
    return results, table, victim


def test_a_node_lost_under_a_two_worker_trial_its_train_run_continues_on_two_other_nodes(cluster, tmp_path):
    """A third node with 2 CPUs joins; a 2-worker trial packs both its Train workers onto it. The node is killed
    under the trial after a checkpoint: the Train run ends, the sweep retries the trial, and its Train run
    continues from its last checkpoint as a DDP group over the two nodes left (one CPU each), ending where
    the same config trained in one process at twice the micro-batch ends (the same global batch and data)."""
    extra = cluster.add_node(cpus=2)
    results, table, victim = _sweep_losing_a_node(cluster, tmp_path, """
        sweep = Sweep(name="ddp-node-loss", workers=2,
                      base={**TINY_CPU, "train.steps": 200, "train.eval_interval": 50, "train.micro_batch_size": 4},
                      space={"train.lr": grid([1e-3])}, metric="val_loss", export=["train.lr"])
    """, extra, ready=lambda reports: any("val_loss" in r for r in reports), trials=1)
    attempts = _attempts(results / "trials" / victim)
    assert attempts[0]["node_id"] == extra and attempts[-1]["node_id"] in (cluster.head_id, cluster.worker_id), attempts
    summary = json.loads((results / "trials" / victim / "summary.json").read_text())
    assert summary["step"] == 200 and summary["resumed_from_step"] >= 50  # from a Train checkpoint, not step 0
    pairs = [(r["step"], "val_loss" in r) for r in _reports(results, victim)]
    assert pairs == sorted(set(pairs)) and pairs[-1][0] == 200
    alone = train_like(results / "trials" / victim / "summary.json", train__micro_batch_size=8)
    assert alone["tokens"] == summary["tokens"]
    assert summary["val_loss"] == pytest.approx(alone["val_loss"], rel=0, abs=2e-5)


def test_a_node_lost_mid_trial_its_trial_continues_on_the_other_from_its_checkpoint(cluster, tmp_path):
    """Takes the worker node away. Both trials train the same model (log_interval differs only in
    how often it reports), so the interrupted one must end with the uninterrupted one's exact val_loss."""
    results, table, victim = _sweep_losing_a_node(cluster, tmp_path, """
        sweep = Sweep(name="node-loss", base={**TINY_CPU, "train.steps": 600, "train.eval_interval": 100},
                      space={"train.log_interval": grid([5, 10])}, metric="val_loss", export=["train.lr"])
    """, cluster.worker_id, ready=lambda reports: reports[-1].get("step", 0) >= 200)
    assert table[victim]["node_id"] == cluster.head_id  # it finished on the node that was left
    attempts = _attempts(results / "trials" / victim)
    assert [a["node_id"] for a in attempts] == [cluster.worker_id, cluster.head_id], attempts
    other = next(t for t in table if t != victim)
    summary = json.loads((results / "trials" / victim / "summary.json").read_text())
    assert summary["step"] == 600 and summary["resumed_from_step"] >= 100  # from a checkpoint, not from step 0
    assert float(table[victim]["val_loss"]) == float(table[other]["val_loss"])
    # one uninterrupted stream of reports: each (step, kind) once, in order, no step missing around the loss
    reports = _reports(results, victim)
    pairs = [(r["step"], "val_loss" in r) for r in reports]
    assert pairs == sorted(set(pairs)) and pairs[-1][0] == 600
    every = int(table[victim]["train.log_interval"])
    assert {r["step"] for r in reports if "loss" in r and r["step"] < 600} == set(range(every, 600, every))


def test_a_killed_clusters_leftover_address_does_not_stall_an_embedded_ray(cluster, tmp_path):
    """After the cluster's processes are SIGKILLed (no `ray stop`), its address file is still there. Neither
    the embedded Ray a sweep starts (its dashboard on, the default) nor Ray's state API inside it (which would wait
    40 s on the dead address for each question) is led to it, and the start does not name it as a running cluster."""
    cluster.kill_all()
    wait_for(lambda: not cluster.processes(), 10, what="the killed cluster's processes to be gone")
    assert ADDRESS_FILE.read_text().strip().endswith(f":{cluster.port}")
    first, got = _embedded_start(tmp_path, _env(), dashboard=True)
    assert first.startswith("ray: embedded local Ray (a new instance") and f":{cluster.port}" not in first, first
    assert "dashboard http://" in first, first
    assert got["state api"] == got["nodes"] and len(got["nodes"]) == 1, got  # its own node, from its own dashboard
    assert got["took"] < 60, got
