"""Trials ask Ray for their GPUs: on a local Ray that declares two (fake) GPUs on this CPU machine.

Ray schedules by declared resources and sets each trial's CUDA_VISIBLE_DEVICES to the GPU it assigned, so the
placement, the concurrency and the refusal to train on the CPU in place of a GPU can all be checked here.
"""

from __future__ import annotations

import io
import json

import pytest

from lmtune.sweep.load import load_sweep, resolve, resolve_gpus
from tests.helpers import sweep_file


def test_auto_asks_for_one_gpu_per_worker_on_a_gpu_cluster_unless_the_trials_train_on_the_cpu():
    assert resolve_gpus("auto", {"system.device": "auto"}, cluster_gpus=8) == 1.0
    assert resolve_gpus("auto", {"system.device": "cuda"}, cluster_gpus=8) == 1.0
    assert resolve_gpus("auto", {"system.device": "cpu"}, cluster_gpus=8) == 0.0  # smoke variants
    assert resolve_gpus("auto", {"system.device": "auto"}, cluster_gpus=0) == 0.0
    assert resolve_gpus(2, {"system.device": "cpu"}, cluster_gpus=0) == 2.0  # a number is what it says


def test_every_shipped_sweep_asks_for_gpus_at_seed_size_and_none_in_its_smoke_variant():
    """A sweep made for the CPU (``*_cpu.py``: the scaling ladder at CPU size) asks for none at either size."""
    from tests.conftest import REPO

    for path in sorted((REPO / "sweeps").glob("*.py")):
        sweep, p = load_sweep(path)
        full, smoke = resolve(sweep, p), resolve(sweep, p, smoke=True)
        cpu_only = path.stem.endswith("_cpu")
        assert resolve_gpus(full.gpus, full.base, cluster_gpus=8) == (0.0 if cpu_only else 1.0), path.name
        assert resolve_gpus(smoke.gpus, smoke.base, cluster_gpus=8) == 0.0, path.name


@pytest.mark.slow
def test_trials_request_their_gpus_run_two_at_a_time_and_see_their_own_device(tmp_path):
    """4 trials asking for 1 GPU each on a Ray with 2 GPUs (and 4 CPUs): at most 2 at once, each with its own
    CUDA_VISIBLE_DEVICES; the two with system.device='auto' find no CUDA device and end as an error that says so,
    instead of training on the CPU."""
    import ray

    from lmtune.sweep.runner import run

    path = sweep_file(tmp_path, """
        sweep = Sweep(
            name="fake-gpus", base={**TINY_CPU, "train.steps": 40, "train.eval_interval": 20},
            space={"system.device": grid(["cpu", "auto"]), "train.seed": grid([1, 2])},
            metric="val_loss", mode="min", gpus=1,
        )
    """)
    sweep, p = load_sweep(path)
    rs = resolve(sweep, p)
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = io.StringIO()
        outcome = run(rs, storage=str(tmp_path / "results"), wandb=False, render=False, out=out)
    finally:
        ray.shutdown()
    assert "1 CPU + 1 GPU each (gpus=1;" in out.getvalue()
    summaries = [json.loads((outcome.results_dir / "trials" / r["trial_id"] / "summary.json").read_text())
                 for r in outcome.rows]
    by_device = {}
    for s in summaries:
        by_device.setdefault(s["config"]["system.device"], []).append(s)
    assert [s["status"] for s in by_device["cpu"]] == ["ok", "ok"]
    assert [s["status"] for s in by_device["auto"]] == ["error", "error"]
    assert all("sees no CUDA device" in s["error"] and "does not train on the CPU" in s["error"] for s in by_device["auto"])
    assert {s["cuda_visible_devices"] for s in summaries} <= {"0", "1"}
    assert all(s["gpu_ids"] == s["cuda_visible_devices"] for s in summaries)
    # Never more than two at once, and two that overlapped had different GPUs.
    spans = [(s["started_at"], s["ended_at"], s["cuda_visible_devices"]) for s in summaries]
    events = sorted([(start, 1) for start, _, _ in spans] + [(end, -1) for _, end, _ in spans])
    running = [sum(d for _, d in events[: i + 1]) for i in range(len(events))]
    assert max(running) <= 2, spans
    for i, (s1, e1, g1) in enumerate(spans):
        for s2, e2, g2 in spans[i + 1:]:
            if s1 < e2 and s2 < e1:
                assert g1 != g2, spans  # two at once never share a GPU
    rows = (outcome.results_dir / "trials.csv").read_text().splitlines()
    assert "cuda_visible_devices" in rows[0] and "node_ip" in rows[0]


@pytest.mark.slow
def test_a_trial_that_asked_for_a_gpu_trains_on_the_device_ray_assigned_it(tmp_path, monkeypatch):
    """On a local Ray that declares two GPUs, with the validating fake CUDA backend in every trial process
    (lmtune.device, LMTUNE_FAKE_CUDA): each trial's set-up runs lmtune's CUDA branches in a Ray actor, against the
    CUDA_VISIBLE_DEVICES Ray gave it, and its summary says it trained on the (fake) GPU, not on the CPU."""
    import ray

    from lmtune.sweep.runner import run

    name = "NVIDIA A100-SXM4-40GB"
    monkeypatch.setenv("LMTUNE_FAKE_CUDA", f"devices=2,memory_gib=40,name={name}")  # Ray's processes inherit it
    path = sweep_file(tmp_path, """
        sweep = Sweep(
            name="fake-cuda", base={**TINY_CPU, "system.device": "cuda", "train.steps": 20, "train.eval_interval": 10},
            space={"train.seed": grid([1, 2])}, metric="val_loss", mode="min", gpus=1,
        )
    """)
    sweep, p = load_sweep(path)
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = run(resolve(sweep, p), storage=str(tmp_path / "results"), wandb=False, render=False, out=io.StringIO())
    finally:
        ray.shutdown()
    summaries = [json.loads((outcome.results_dir / "trials" / r["trial_id"] / "summary.json").read_text())
                 for r in outcome.rows]
    assert [s["status"] for s in summaries] == ["ok", "ok"]
    for s in summaries:
        assert s["device_name"] == name and s["memory_model"].startswith("cuda: caching allocator")
        assert s["cuda_visible_devices"] in {"0", "1"} and s["gpu_ids"] == s["cuda_visible_devices"]
        assert s["device_memory_gib"] == pytest.approx(40.0) and s["mfu"] > 0


def test_the_workers_a_cluster_can_hold_at_once_and_the_refusal_when_it_holds_too_few():
    from lmtune.sweep.checks import unplaceable, worker_bundle, worker_slots

    two_cpus = [{"CPU": 2.0, "memory": 8e9}]
    assert worker_slots(two_cpus, worker_bundle(1, 0)) == 2
    assert worker_slots(two_cpus, worker_bundle(0.5, 0)) == 4  # fractions pack
    assert worker_slots(two_cpus, worker_bundle(4, 0)) == 0
    assert worker_slots(two_cpus, worker_bundle(1, 1)) == 0  # a GPU no node has
    # every worker on one node: two 3-CPU nodes hold two 2-CPU workers, not three
    assert worker_slots([{"CPU": 3.0}, {"CPU": 3.0}], worker_bundle(2, 0)) == 2
    # an autoscaler's node types: so many of each, or no limit
    gpu_types = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 96.0, "GPU": 8.0}]
    assert worker_slots(gpu_types, worker_bundle(1, 1), counts=[2, 0]) == 2
    assert worker_slots(gpu_types, worker_bundle(1, 1), counts=[0, -1]) == float("inf")
    assert worker_slots(gpu_types, worker_bundle(1, 2), counts=[8, 0]) == 0
    line = unplaceable(worker_bundle(1, 1), 1, two_cpus, "this machine's embedded Ray")
    assert line.startswith("each trial asks for 1 CPU + 1 GPU, but no node of the cluster (this machine's embedded "
                           "Ray, 1 node: 2 CPUs, no GPU) has that much: no trial could ever start."), line
    line = unplaceable(worker_bundle(1, 0), 3, two_cpus, "this machine's embedded Ray")
    assert "asks for 3 workers × (1 CPU), but the cluster (this machine's embedded Ray, 1 node: 2 CPUs, no GPU) " \
           "holds 2 such workers at once" in line, line


def test_a_joined_cluster_is_refused_only_when_its_autoscaler_cannot_add_a_node_that_holds_the_trial(monkeypatch):
    """cluster.yaml's head has no CPU for trials and its GPU nodes start on demand: at first no node holds a GPU
    trial, and the sweep must wait for the autoscaler, not be refused; a trial no node type holds is refused."""
    from lmtune.config import ConfigError
    from lmtune.sweep import compat
    from lmtune.sweep.checks import check_placeable, worker_bundle
    from tests.conftest import REPO

    monkeypatch.setattr(compat, "BOOTSTRAP_CONFIG", REPO / "cluster.yaml")  # what `ray up` leaves on the head
    types = compat.autoscaler_node_types()
    assert types == [("head", {"CPU": 0.0}, 1), ("gpu1", {"CPU": 8.0, "GPU": 1.0}, 8),
                     ("gpu8", {"CPU": 96.0, "GPU": 8.0}, 2)]
    head_only = [{"CPU": 0.0, "memory": 3e10}]
    note = check_placeable(worker_bundle(1, 1), 1, head_only, "c", node_types=types, can_grow=True)
    assert note.startswith("note: each trial asks for 1 CPU + 1 GPU, which no node of the cluster has now (1 node: no "
                           "CPU, no GPU); its autoscaler may add such nodes (node types: gpu1, gpu8)"), note
    assert "node types: gpu8)" in check_placeable(worker_bundle(8, 4), 1, head_only, "c", node_types=types,
                                                  can_grow=True)
    with pytest.raises(ConfigError, match=r"asks for 1 CPU \+ 16 GPU.*cannot either \(head: no CPU, no GPU; gpu1: 8 "
                                          r"CPUs, 1 GPU; gpu8: 96 CPUs, 8 GPUs\)"):
        check_placeable(worker_bundle(1, 16), 1, head_only, "c", node_types=types, can_grow=True)
    # 16 one-GPU workers at once: eight gpu1 nodes and two gpu8 nodes hold 24
    assert check_placeable(worker_bundle(1, 1), 16, head_only, "c", node_types=types, can_grow=True).startswith("note")
    with pytest.raises(ConfigError, match="holds 0 such workers|no node of the cluster"):
        check_placeable(worker_bundle(1, 1), 25, head_only, "c", node_types=types, can_grow=True)
    # no autoscaler known (a cluster of `ray start` nodes): a node may yet be started by hand
    assert check_placeable(worker_bundle(1, 1), 1, head_only, "c", can_grow=True).startswith("warning: ")
    monkeypatch.setattr(compat, "BOOTSTRAP_CONFIG", REPO / "no-such-file.yaml")
    assert compat.autoscaler_node_types() is None


def test_progress_says_what_a_held_back_trial_waits_for_and_how_long():
    from lmtune.sweep import progress
    from tests.helpers import Clock

    out, clock = io.StringIO(), Clock()
    p = progress.Progress(out, 2, interval_s=30, clock=clock, tty=False, wants="2 CPU", free=lambda: "1 of 2 CPUs")
    assert p.pending(["aaaa1111"]) == []
    clock.t += progress.WAIT_SHOWN_S
    assert p.pending(["aaaa1111"]) == ["aaaa1111"] and p.pending(["aaaa1111"]) == []  # one event line per trial
    assert p.waits_for() == "for 2 CPU (free now: 1 of 2 CPUs)"
    clock.t += 30 - progress.WAIT_SHOWN_S
    p.tick()  # nothing runs, and yet the block comes: a trial waits
    assert out.getvalue().splitlines() == ["progress: 0/2 done, 0 running, 1 waiting, 30s elapsed",
                                           "  aaaa1111  waiting 30s for 2 CPU (free now: 1 of 2 CPUs)"]
    p.start("aaaa1111", 10)
    assert p.waiting == {} and "waiting" not in "".join(p.lines())
    # a Ray Train trial runs (its process holds no CPU) while its workers wait: said once it has waited
    w = progress.Progress(io.StringIO(), 1, clock=clock, tty=False, wants="2 workers × (1 CPU)",
                          free=lambda: "0 of 2 CPUs", workers=2)
    w.start("bbbb2222", 10)
    clock.t += progress.WAIT_SHOWN_S
    assert w.lines()[1].endswith("no report yet: its workers need 2 workers × (1 CPU) (free now: 0 of 2 CPUs)")
    w.report("bbbb2222", {"step": 1})
    assert "no report yet" not in w.lines()[1]


@pytest.mark.slow
def test_trials_no_node_can_hold_are_refused_and_busy_ones_say_what_they_wait_for(tmp_path, monkeypatch):
    """On a Ray of 2 CPUs: trials asking 4 CPUs, or 3 one-CPU workers at once, are refused before any trial starts
    (Tune would hold them PENDING forever, without a word); a trial asking 2 CPUs while another job holds one waits,
    says what for, and runs once the CPU is free."""
    import threading

    import ray

    from lmtune.config import ConfigError
    from lmtune.sweep import progress
    from lmtune.sweep.runner import run

    path = sweep_file(tmp_path, """
        sweep = Sweep(name="busy", base={**TINY_CPU, "train.steps": 10, "train.eval_interval": 10},
                      space={"train.seed": grid([1])}, metric="val_loss", mode="min")
    """)
    sweep, p = load_sweep(path)
    storage = tmp_path / "results"
    monkeypatch.setattr(progress, "WAIT_SHOWN_S", 1.0)  # seconds of this test, not the console's 10
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for cpus, workers, said in [(4, 1, "each trial asks for 4 CPU, but no node of the cluster"),
                                    (1, 3, "each trial asks for 3 workers × (1 CPU), but the cluster")]:
            sweep.workers = workers
            with pytest.raises(ConfigError, match="no trial could ever start") as refused:
                run(resolve(sweep, p, cpus=cpus), storage=str(storage), wandb=False, render=False, out=io.StringIO())
            assert said in str(refused.value) and "1 node: 2 CPUs, no GPU" in str(refused.value)
            assert not any(storage.iterdir())  # no results directory left behind
        sweep.workers = 1

        @ray.remote(num_cpus=1)
        class OtherJob:
            def ready(self):
                return True

        other = OtherJob.remote()
        ray.get(other.ready.remote())
        threading.Timer(4.0, ray.kill, [other]).start()
        out = io.StringIO()
        outcome = run(resolve(sweep, p, cpus=2), storage=str(storage), wandb=False, render=False, out=out)
    finally:
        ray.shutdown()
    (row,) = outcome.rows
    assert row["status"] == "ok", out.getvalue()
    text = out.getvalue()
    assert f"waiting  {row['trial_id']}  for 2 CPU (free now: 1 of 2 CPUs)" in text, text
    assert text.index("waiting  ") < text.index(f"start    {row['trial_id']}"), text


@pytest.mark.slow
def test_a_gpu_sweep_on_a_machine_without_one_is_refused_in_one_line(tmp_path):
    """The first-day trap as a user met it: `--gpus 1` on a CPU machine waited for minutes without a word (asked
    here for more GPUs than any one machine has, so that a GPU machine refuses it too)."""
    from tests.conftest import REPO, run_module

    proc = run_module("lmtune.sweep", str(REPO / "sweeps" / "weight_decay.py"), "--smoke", "--gpus", "64",
                      "--storage", str(tmp_path / "results"), "--no-dashboard", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: each trial asks for 1 CPU + 64 GPU, but no node of the cluster (this machine's "
                           "embedded Ray, 1 node: ") and ") has that much: no trial could ever start" in line, line
    assert "start " not in proc.stdout and not any((tmp_path / "results").iterdir())
