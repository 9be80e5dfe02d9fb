"""The memory frontier end to end on the real stack: sweep → frontier tables → export → trainer.

* the shipped ``sweeps/memory_frontier.py --smoke``: an emulated device limit on CPU that the larger
  micro-batches really cross; statuses, implied OOMs never launched (counted in Tune's trial dirs),
  frontier table rows equal to the trial results, a PNG, a recommended point; export writes locked defaults
  that the next ``python -m lmtune.train`` uses; a second export without --force is refused;
* a real ``torch.OutOfMemoryError`` raised in the trainer at a chosen micro-batch: oom rows, never retried,
  larger micro-batches implied.
"""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import REPO, TINY, run_module
from tests.test_sweep_e2e import only_run, rows, sweep_file

pytestmark = pytest.mark.slow


def _frontier_rows(results):
    with open(results / "frontier.csv", newline="") as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


def _launched(results) -> set[str]:
    """The trials Ray actually ran: Tune's trial directories."""
    return {p.name for p in (results / "tune").iterdir() if p.is_dir() and not p.name.startswith(".")}


def test_memory_frontier_smoke_then_export_then_train(in_tmp):
    proc = run_module("lmtune.sweep", str(REPO / "sweeps" / "memory_frontier.py"), "--smoke", "--no-wandb",
                      cwd=in_tmp, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = only_run(in_tmp / "results")
    table = rows(results)
    ran = {t for t, r in table.items() if r["source"] == "run"}
    implied = {t for t, r in table.items() if r["source"] in ("implied", "predicted")}
    assert ran == _launched(results)  # every row that says it ran did, and nothing else ran
    assert implied and all(table[t]["status"] == "oom" for t in implied)
    assert {r["status"] for r in table.values()} == {"ok", "oom"}
    limit = json.loads((results / "sweep.json").read_text())["memory_limit_gib"]
    for r in table.values():  # the emulated limit was really crossed by what ran as oom, and only by it
        if r["source"] == "run":
            assert (float(r["peak_reserved_gib"]) > limit) == (r["status"] == "oom"), r
    budget_mb = {}
    for r in table.values():
        budget_mb.setdefault(r["train.ac_budget"], []).append((int(r["train.micro_batch_size"]), r["status"]))
    for points in budget_mb.values():  # monotone: nothing ok above an oom at the same budget
        first_oom = min((mb for mb, s in points if s == "oom"), default=None)
        assert first_oom is None or all(s == "oom" for mb, s in points if mb >= first_oom)
    frontier = _frontier_rows(results)
    assert set(frontier) == set(table)
    for t, r in frontier.items():
        for key in ("peak_reserved_gib", "tokens_per_s"):
            if table[t][key]:
                assert float(r[key]) == pytest.approx(float(table[t][key]))
    md = (results / "frontier.md").read_text()
    assert "Recommended operating point:" in md and "OOM (implied)" in md
    assert (results / "plots" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # At every micro-batch both budgets ran at, the lower budget peaked lower (by at least 10%): on CPU the
    # frontier shows what activation checkpointing saves, not only what it costs.
    peaks = {(r["train.ac_budget"], r["train.micro_batch_size"]): float(r["peak_reserved_gib"])
             for r in table.values() if r["source"] == "run" and r["status"] == "ok"}
    both = [mb for (b, mb) in peaks if b == "0.5" and ("1.0", mb) in peaks]
    assert both and all(peaks[("0.5", mb)] < 0.9 * peaks[("1.0", mb)] for mb in both), peaks
    assert "AC mode: blocks" in md and "ac_budget=0.5 (blocks)" in md

    refused = run_module("lmtune.export", str(results), cwd=in_tmp)  # a smoke run: not silently the defaults
    assert refused.returncode == 2 and "a --smoke run" in refused.stderr
    assert not (in_tmp / "lmtune.locked.toml").exists()
    export = run_module("lmtune.export", str(results), "--force", cwd=in_tmp)
    assert export.returncode == 0, export.stderr
    locked = (in_tmp / "lmtune.locked.toml").read_text()
    assert "[provenance.\"train.micro_batch_size\"]" in locked and 'ac_mode = "blocks"' in locked
    train = run_module("lmtune.train", *[a for a in TINY if not a.startswith(("train.micro_batch_size", "train.ac_budget"))],
                       "train.steps=2", "train.eval_interval=2", "--no-wandb", "--out", "after", cwd=in_tmp)
    assert train.returncode == 0, train.stderr
    used = json.loads((in_tmp / "after" / "summary.json").read_text())["config"]
    recommended = json.loads((results / "frontier.json").read_text())["recommended"]
    assert used["train.micro_batch_size"] == recommended["train.micro_batch_size"]
    assert used["train.ac_budget"] == recommended["line"]["train.ac_budget"]  # an eager run: the blocks budget applies
    before = (in_tmp / "lmtune.locked.toml").read_text()
    again = run_module("lmtune.export", str(results), "--to", "lmtune.locked.toml", cwd=in_tmp)
    assert again.returncode == 2 and "--force" in again.stderr
    assert (in_tmp / "lmtune.locked.toml").read_text() == before


def test_injected_torch_oom_in_trials_is_a_result(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_FAULT_OOM_MICRO_BATCH", "8")
    f = sweep_file(tmp_path, """
        from lmtune.sweep import Frontier
        sweep = Sweep(
            name="inject-oom",
            base={**TINY_CPU, "train.steps": 4, "train.eval_interval": 4, "train.log_interval": 2},
            space={"train.micro_batch_size": grid([2, 4, 8, 16, 32]), "train.ac_budget": grid([1.0])},
            searcher="frontier", frontier=Frontier(headroom_gib=0.0), metric="tokens_per_s", mode="max",
            max_failures=2,
        )
    """)
    proc = run_module("lmtune.sweep", str(f), "--storage", str(tmp_path / "results"), "--no-wandb", "--no-dashboard",
                      cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = only_run(tmp_path / "results")
    table = rows(results)
    by_mb = {int(r["train.micro_batch_size"]): r for r in table.values()}
    assert [by_mb[mb]["status"] for mb in (2, 4)] == ["ok", "ok"]
    assert by_mb[8]["status"] == "oom" and by_mb[8]["source"] == "run"
    assert "injected" in (results / "trials" / by_mb[8]["trial_id"] / "summary.json").read_text()
    # 16 and 32 were not launched: OOM by implication (never retried, never run)
    assert {by_mb[mb]["source"] for mb in (16, 32)} == {"implied"}
    assert _launched(results) == {by_mb[mb]["trial_id"] for mb in (2, 4, 8)}
    lines = (results / "trials" / by_mb[8]["trial_id"] / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["status"] == "oom" for line in lines) == 1  # one attempt, not retried
