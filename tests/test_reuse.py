"""Trial reuse (lmtune/sweep/reuse.py): a sweep does not train again a trial its storage already holds finished with the
same fingerprint; the index at the storage root survives two writers at once and is rebuilt when missing or corrupt."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmtune.contract import REUSE_INDEX
from lmtune.sweep import reuse
from tests.conftest import REPO
from tests.helpers import rows, sweep_file


def _entry(fp: str, run: str = "1-a-x", trial: str = "t1", status: str = "ok") -> dict:
    return {"fingerprint": fp, "run": run, "trial_id": trial, "status": status, "device_hours": 0.01,
            "result": {"status": status, "val_loss": 5.0, "fingerprint": fp}}


def _a_run(root, name: str, summaries: dict[str, dict]) -> None:
    run = root / name
    (run / "trials").mkdir(parents=True)
    (run / "sweep.json").write_text("{}")
    for tid, summary in summaries.items():
        (run / "trials" / tid).mkdir()
        (run / "trials" / tid / "summary.json").write_text(json.dumps({"trial_id": tid, **summary}))


def test_only_finished_ok_and_oom_trials_with_a_fingerprint_arereusable_trials(tmp_path):
    assert reuse.entry_of(tmp_path, {"status": "ok", "fingerprint": "f", "trial_id": "t", "val_loss": 4.0,
                                     "node_id": "n", "config": {}})["result"] == {"status": "ok", "fingerprint": "f",
                                                                                 "val_loss": 4.0}
    assert reuse.entry_of(tmp_path, {"status": "oom", "fingerprint": "f"}) is not None
    for status in ("error", "pruned", "diverged", "host_oom"):
        assert reuse.entry_of(tmp_path, {"status": status, "fingerprint": "f"}) is None, status
    assert reuse.entry_of(tmp_path, {"status": "ok"}) is None  # a run from before fingerprints
    assert reuse.entry_of(tmp_path, {"status": "ok", "fingerprint": "f", "reused_from": "r/t"}) is None  # a copy


def test_a_missing_or_corrupt_index_is_rebuilt_from_the_runs_summaries_with_one_line(tmp_path):
    _a_run(tmp_path, "1-a-x", {"t1": {"status": "ok", "fingerprint": "f1"}, "t2": {"status": "error", "fingerprint": "f2"}})
    _a_run(tmp_path, "2-b-y", {"t3": {"status": "oom", "fingerprint": "f3"}})
    out = io.StringIO()
    assert set(reuse.load(tmp_path, out)) == {"f1", "f3"}
    assert out.getvalue().count("\n") == 1 and "was missing; rebuilt from 2 run(s)' summaries (2 reusable" in out.getvalue()
    with open(tmp_path / REUSE_INDEX, "a") as f:
        f.write("{not json\n")
    out = io.StringIO()
    assert set(reuse.load(tmp_path, out)) == {"f1", "f3"} and "was corrupt (line 3)" in out.getvalue()
    out = io.StringIO()
    assert set(reuse.load(tmp_path, out)) == {"f1", "f3"} and out.getvalue() == ""  # whole again: read as it is
    assert reuse.load(tmp_path / "empty", out) == {} and out.getvalue() == ""  # a new storage: nothing to say


def _write_many(root: str, who: str) -> None:
    for i in range(200):
        reuse.record(Path(root), _entry(f"{who}-{i}", run=who))


def test_two_sweeps_writing_the_index_at_once_leave_every_entry_whole(tmp_path):
    procs = [multiprocessing.get_context("spawn").Process(target=_write_many, args=(str(tmp_path), w)) for w in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    out = io.StringIO()
    found = reuse.load(tmp_path, out)
    assert len(found) == 400 and {e["run"] for e in found.values()} == {"a", "b"} and out.getvalue() == ""


def _sweep(tmp_path, seeds: list[int]):
    return sweep_file(tmp_path, f"""
        sweep = Sweep(name="reuse", base={{**TINY_CPU, "train.steps": 6, "train.eval_interval": 3}},
                      space={{"train.seed": grid({seeds})}}, metric="val_loss", mode="min")
    """, name=f"reuse{len(seeds)}.py")


def _sweep_run(sweep, storage, *, pythonpath=REPO) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "WANDB_MODE": "disabled"}
    before = set(storage.glob("*-reuse-*")) if storage.exists() else set()
    proc = subprocess.run([sys.executable, "-m", "lmtune.sweep", str(sweep), "--storage", str(storage), "--no-wandb",
                           "--no-report", "--no-dashboard"], env=env, capture_output=True, text=True, timeout=300,
                          cwd=sweep.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = set(storage.glob("*-reuse-*")) - before
    return proc, rows(run)


@pytest.mark.slow
def test_a_sweep_run_again_trains_only_what_the_storage_does_not_hold_and_a_code_change_trains_everything(tmp_path):
    storage = tmp_path / "results"
    _, first = _sweep_run(_sweep(tmp_path, [0, 1]), storage)
    assert {r["source"] for r in first.values()} == {"run"}
    # one grid value more: the two finished configurations are reused, only the new one trains
    proc, second = _sweep_run(_sweep(tmp_path, [0, 1, 2]), storage)
    by_seed = {r["train.seed"]: r for r in second.values()}
    assert [by_seed[s]["source"] for s in ("0", "1", "2")] == ["reused", "reused", "run"], proc.stdout
    first_by_seed = {r["train.seed"]: r for r in first.values()}
    (first_run,) = {p.parent for p in storage.glob("*/trials.csv") if rows(p.parent) == first}
    for seed in ("0", "1"):
        reused, original = by_seed[seed], first_by_seed[seed]
        assert reused["reused_from"] == f"{first_run.name}/{original['trial_id']}"
        assert reused["val_loss"] == original["val_loss"] and reused["status"] == "ok"
        new_dir = next(storage.glob(f"*/trials/{reused['trial_id']}"))
        assert (new_dir / "metrics.jsonl").read_text() == (first_run / "trials" / original["trial_id"] /
                                                           "metrics.jsonl").read_text()  # the curves, copied
    assert "reuse: 2 trial(s) not trained again" in proc.stdout and "1 trained" in proc.stdout
    assert "reused: " in proc.stdout  # the trial's end line says where it came from
    # a one-character change in lmtune/training/: a different experiment, nothing reused
    changed = tmp_path / "changed"
    shutil.copytree(REPO / "lmtune", changed / "lmtune")  # with its bytecode (mtimes kept): only the edited file compiles
    trainer = changed / "lmtune" / "training" / "trainer.py"
    trainer.write_text(trainer.read_text() + "\n#\n")
    proc, third = _sweep_run(_sweep(tmp_path, [0, 1, 2]), storage, pythonpath=changed)
    assert {r["source"] for r in third.values()} == {"run"}, proc.stdout
    assert "reuse: " not in proc.stdout.split("sweep reuse")[1].split("\n\n")[-1]  # no saving to report
    index = [json.loads(line) for line in (storage / REUSE_INDEX).read_text().splitlines()]
    assert len(index) == 2 + 1 + 3  # every trial that trained, once: the reused ones are not entries of their own


def test_rerun_trains_every_trial():
    from lmtune.sweep.runner import reusable_trials

    out = io.StringIO()
    assert reusable_trials(REPO / "no-such-storage", rerun=True, out=out) == {} and "--rerun" in out.getvalue()


def _earlier_sweep(root: Path, name: str, lrs: list[float]) -> Path:
    """A finished TPE sweep over train.lr whose val_loss is least at lr = 10^-4.5: trials.csv and the summaries."""
    import math

    run = root / name
    _a_run(root, name, {f"t{i}": {"status": "ok", "fingerprint": f"{name}{i}", "val_loss": 3 + (math.log10(lr) + 4.5) ** 2,
                                  "config": {"train.lr": lr}} for i, lr in enumerate(lrs)})
    lines = ["trial_id,status,source,train.lr,val_loss"] + [f"t{i},ok,run,{lr},0" for i, lr in enumerate(lrs)]
    (run / "trials.csv").write_text("\n".join(lines) + "\n")
    return run


def test_a_warm_started_tpe_sweep_suggests_from_the_earlier_trials_at_once(tmp_path):
    import math

    from lmtune.sweep import TINY_CPU, Sweep, loguniform
    from lmtune.sweep.load import resolve
    from lmtune.sweep.searchers import make_searcher

    lrs = [10 ** (-5 + 4 * i / 23) for i in range(24)]  # 1e-5 .. 1e-1
    earlier = _earlier_sweep(tmp_path, "1-lr-x", lrs)
    outside = _earlier_sweep(tmp_path, "2-lr-y", [0.5])  # outside the new space's range
    rs = resolve(Sweep(name="lr", base=dict(TINY_CPU), space={"train.lr": loguniform(1e-5, 1e-1)}, num_samples=8),
                 "lr.py")

    def first_suggestions(warm: list[Path], where: Path) -> list[float]:
        where.mkdir()
        searcher = make_searcher(rs, where)
        if warm:
            out = io.StringIO()
            reuse.warm_start(searcher, ["train.lr"], warm, out)
            assert out.getvalue() == ("warm start: 24 finished trial(s) of 2 earlier sweep(s) taken as evidence; 1 left out "
                                      "(outside this sweep's space, or not ok/oom)\n")
            done = [t for t in searcher.study.trials if t.state.is_finished()]
            assert len(done) == 24 and done[0].user_attrs["warm_start"] == "1-lr-x/t0"
        # the first suggestion is the base config's point, enqueued (the sweep's defaults first): the next four
        return [searcher.suggest(f"s{i}")["train.lr"] for i in range(5)][1:]

    cold = first_suggestions([], tmp_path / "cold")
    warm = first_suggestions([earlier, outside], tmp_path / "warm")
    distance = [sum(abs(math.log10(lr) + 4.5) for lr in s) / 4 for s in (cold, warm)]  # in decades from the best
    assert distance[1] < 0.75 and distance[0] > 1.25, (cold, warm)  # TPE's model, not random draws, at once


def test_warm_start_is_refused_in_one_line_where_it_cannot_apply(tmp_path):
    from lmtune.config import ConfigError

    with pytest.raises(ConfigError, match="not a sweep's results directory"):
        reuse.check_warm_start([str(tmp_path)], "tpe", True, False)
    with pytest.raises(ConfigError, match="this sweep runs grid"):
        reuse.check_warm_start([str(tmp_path)], "grid", False, False)
    with pytest.raises(ConfigError, match="resumed sweep keeps its own study"):
        reuse.check_warm_start([str(tmp_path)], "tpe", True, True)
