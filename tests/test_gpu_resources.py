"""Trials ask Ray for their GPUs: on a local Ray that declares two (fake) GPUs on this CPU machine.

Ray schedules by declared resources and sets each trial's CUDA_VISIBLE_DEVICES to the GPU it assigned, so the
placement, the concurrency and the refusal to train on the CPU in place of a GPU can all be checked here.
"""

from __future__ import annotations

import io
import json

import pytest

from lmtune.sweep.load import load_sweep, resolve, resolve_gpus
from tests.test_sweep_e2e import sweep_file


def test_auto_asks_for_one_gpu_per_worker_on_a_gpu_cluster_unless_the_trials_train_on_the_cpu():
    assert resolve_gpus("auto", {"system.device": "auto"}, cluster_gpus=8) == 1.0
    assert resolve_gpus("auto", {"system.device": "cuda"}, cluster_gpus=8) == 1.0
    assert resolve_gpus("auto", {"system.device": "cpu"}, cluster_gpus=8) == 0.0  # smoke variants
    assert resolve_gpus("auto", {"system.device": "auto"}, cluster_gpus=0) == 0.0
    assert resolve_gpus(2, {"system.device": "cpu"}, cluster_gpus=0) == 2.0  # a number is what it says


def test_every_shipped_sweep_asks_for_gpus_at_seed_size_and_none_in_its_smoke_variant():
    from tests.conftest import REPO

    for path in sorted((REPO / "sweeps").glob("*.py")):
        sweep, p = load_sweep(path)
        full, smoke = resolve(sweep, p), resolve(sweep, p, smoke=True)
        assert resolve_gpus(full.gpus, full.base, cluster_gpus=8) == 1.0, path.name
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
