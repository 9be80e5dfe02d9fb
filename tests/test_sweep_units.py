"""Small pieces of the sweep runner, without Ray running: error classification, searcher setup, names."""

from __future__ import annotations

import json
import math
import re
from typing import ClassVar

import optuna
import pytest
from ray.exceptions import OutOfMemoryError, RayTaskError

from lmtune.results.layout import group_name, runs_of
from lmtune.sweep import TINY_CPU, Sweep, compat, grid, loguniform, randint
from lmtune.sweep.ledger import Ledger, TrialDecisions
from lmtune.sweep.load import resolve
from lmtune.sweep.oom import classify, first_line
from lmtune.sweep.resume import requeue_orphans
from lmtune.sweep.schedulers import make_scheduler, max_tokens
from lmtune.sweep.search import enqueued_points, ordered_grid
from lmtune.sweep.searchers import make_searcher


def test_oom_classification_sees_through_wrappers():
    import torch

    assert classify(torch.OutOfMemoryError("CUDA out of memory")) == "oom"
    assert classify(MemoryError()) == "oom"
    monitor = OutOfMemoryError("1 worker(s) were killed due to the node running low on memory.")
    wrapped = RayTaskError("lmtune_trial", "traceback", monitor)
    assert classify(wrapped) == "oom"
    try:
        try:
            raise monitor
        except OutOfMemoryError as e:
            raise RuntimeError("Training failed") from e
    except RuntimeError as outer:
        assert classify(outer) == "oom"
    assert classify(ValueError("shape mismatch")) == "error"
    assert classify(RuntimeError("Expected all tensors to be on the same device")) == "error"
    assert first_line("Failure # 1 (occurred at x)\nTraceback (most recent call last):\n  File 'a'\nKeyError: 'x'") == "KeyError: 'x'"


# What Tune's error file of a failed trial reads (its text is all the driver has when the pickled error does not load).
TRIAL_ERRORS = {
    "oom": [
        "Failure # 1 (occurred at 2026-12-01_10-00-00)\n\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=4242, "
        "ip=10.0.0.2, repr=lmtune trial 1a2b3c4d)\n  File \"/venv/ray/tune/trainable/trainable.py\", line 331, in "
        "train\n    raise skipped from exception_cause(skipped)\ntorch.OutOfMemoryError: CUDA out of memory. Tried to "
        "allocate 2.00 GiB. GPU 0 has a total capacity of 39.39 GiB of which 1.06 GiB is free.",
        "Failure # 1 (occurred at 2026-12-01_10-00-00)\nray.exceptions.OutOfMemoryError: Task was killed due to the "
        "node running low on memory.\nMemory on the node (IP: 10.0.0.2, ID: 4f2a) where the task (actor ID: 9c1e, "
        "name=ImplicitFunc.__init__, pid=4242, memory used=12.1GB) was running was 14.50GB / 15.00GB (0.966667), "
        "which exceeds the memory usage threshold of 0.95. Ray killed this worker (ID: 77ab) because it was the "
        "most recently scheduled task.",
        "Failure # 1 (occurred at 2026-12-01_10-00-00)\nray.train.v2.api.exceptions.WorkerGroupError: Training "
        "failed due to worker errors:\n[Rank 1]:\nTraceback (most recent call last):\n  File \"/venv/lmtune/"
        "training/trainer.py\", line 212, in fit\nRuntimeError: DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)",
        "Traceback (most recent call last):\n  File \"/venv/lmtune/training/memory.py\", line 90, in check_limit\n"
        "lmtune.training.memory.EmulatedOOM: peak allocated 0.445 GiB crossed system.memory_limit_gib=0.42",
    ],
    "error": [
        "Failure # 1 (occurred at 2026-12-01_10-00-00)\nTraceback (most recent call last):\n  File \"/venv/lmtune/"
        "training/checkpoint.py\", line 40, in read_checkpoint\nFileNotFoundError: [Errno 2] No such file or "
        "directory: '/runs/out of memory/x/checkpoint.pt'",
        "Failure # 1 (occurred at 2026-12-01_10-00-00)\n\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=4242, "
        "repr=lmtune trial out-of-memory-probe)\nValueError: could not read /data/OutOfMemoryError: notes/shard.bin",
        "Failure # 1 (occurred at 2026-12-01_10-00-00)\nray.exceptions.ActorDiedError: The actor died unexpectedly "
        "before finishing this task. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits "
        "with a connection error code 2. End of file. Some common causes include: (1) the process was killed by the "
        "OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the worker crashed unexpectedly "
        "due to SIGSEGV or another unexpected error.",
    ],
}


def check_oom_from_error_text(tmp_path) -> None:
    """A failed trial known only by its error file's text is oom on evidence (an OOM exception's type line, torch's
    allocator message, Ray's memory monitor's own report) and never on words in a path, a trial's name or Ray's list
    of what might have killed a worker."""
    from lmtune.sweep.oom import classify_trial_error

    class Trial:  # what Tune leaves of a failed trial: its error file
        pickled_error_file = None
        error_file = str(tmp_path / "error.txt")

    for kind, texts in TRIAL_ERRORS.items():
        for text in texts:
            (tmp_path / "error.txt").write_text(text)
            assert classify_trial_error(Trial)[0] == kind, text


def test_oom_from_an_error_text_known_answers(tmp_path):
    check_oom_from_error_text(tmp_path)


@pytest.mark.parametrize("broken", [
    lambda text: "out of memory" in text.lower(),  # the words, wherever they are
    lambda text: "OutOfMemoryError" in text or "memory" in text.lower() and "killed" in text,  # a type's name anywhere
], ids=["words", "names-anywhere"])
def test_oom_text_check_catches_words_taken_for_evidence(broken, tmp_path, monkeypatch):
    from lmtune.sweep import oom

    monkeypatch.setattr(oom, "_oom_text", broken)
    with pytest.raises(AssertionError):
        check_oom_from_error_text(tmp_path)


def check_tpe_gamma(gamma) -> None:
    """TPE models a quarter of the finished trials (rounded up) as the good ones, at most 25 (searchers.tpe_gamma's
    reason: Optuna's tenth is one to three trials of a small sweep)."""
    ns = (1, 4, 5, 8, 9, 40, 99, 100, 101, 1000)
    assert [gamma(n) for n in ns] == [1, 1, 2, 2, 3, 10, 25, 25, 25, 25]


def gamma_of_the_sampler_lmtune_builds(monkeypatch, tmp_path):
    """The ``gamma`` make_searcher hands to Optuna's TPESampler for a TPE sweep."""
    built = {}
    sampler = optuna.samplers.TPESampler

    def spy(*args, **kwargs):
        built.update(kwargs)
        return sampler(*args, **kwargs)

    monkeypatch.setattr(optuna.samplers, "TPESampler", spy)
    rs = resolve(Sweep(name="g", base=dict(TINY_CPU), space={"train.lr": loguniform(1e-4, 1e-2)}), "g.py")
    make_searcher(rs, tmp_path)
    return built["gamma"]


def test_tpe_gamma_known_answers(monkeypatch, tmp_path):
    check_tpe_gamma(gamma_of_the_sampler_lmtune_builds(monkeypatch, tmp_path))


@pytest.mark.parametrize("broken", [
    lambda n: max(math.ceil(0.25 * n), 25),  # at least 25: every trial of a small sweep is "good"
    lambda n: min(int(0.25 * n), 25),  # rounded down: no good trial before the fourth
], ids=["max", "rounded-down"])
def test_tpe_gamma_check_catches_a_wrong_gamma(broken, monkeypatch, tmp_path):
    from lmtune.sweep import searchers

    monkeypatch.setitem(searchers.TPE_OPTIONS, "gamma", broken)
    with pytest.raises(AssertionError):
        check_tpe_gamma(gamma_of_the_sampler_lmtune_builds(monkeypatch, tmp_path))


def test_ledger_status():
    ledger = TrialDecisions()
    ledger.pruned["t-pruned"] = 1000
    ledger.errors["t-oom"] = ("oom", "killed")
    assert ledger.status_of("t-pruned", {"status": "running"}) == "pruned"
    assert ledger.status_of("t-oom", None, error=True) == "oom"
    assert ledger.status_of("t-x", {"status": "diverged"}) == "diverged"
    assert ledger.status_of("t-y", {"status": "running"}) == "error"  # ended without the final report
    assert ledger.status_of("t-z", {"status": "ok"}, error=True) == "error"


def test_defaults_first_and_searcher_setup(tmp_path):
    # Locked defaults: pre-LN, warmup 0, lr 6e-4 — they come first where they lie in the space.
    grid_sweep = Sweep(name="g", base=dict(TINY_CPU),
                       space={"model.norm_placement": grid(["post", "pre"]), "train.warmup_steps": grid([10, 0])})
    rs = resolve(grid_sweep, "g.py")
    assert ordered_grid(rs) == {"model.norm_placement": ["pre", "post"], "train.warmup_steps": [0, 10]}
    searcher = make_searcher(rs, tmp_path)
    first = searcher.suggest("trial-1")
    assert first == {"model.norm_placement": "pre", "train.warmup_steps": 0}
    seen = [first] + [searcher.suggest(f"trial-{i}") for i in range(2, 5)]
    assert len({tuple(sorted(p.items())) for p in seen}) == 4  # the grid, each point once
    assert (tmp_path / "optuna.db").is_file()

    mixed = Sweep(name="m", base=dict(TINY_CPU), num_samples=2,
                  space={"train.optimizer": grid(["sgd", "adamw"]), "train.lr": loguniform(1e-4, 1e-2)})
    rs = resolve(mixed, "m.py")
    assert rs.num_trials == 4
    points = enqueued_points(rs)
    assert points[0] == {"train.optimizer": "adamw", "train.lr": 6e-4}
    assert [p["train.optimizer"] for p in points] == ["adamw", "sgd", "adamw", "sgd"]


def test_searcher_tells_optuna_pruned_and_infeasible(tmp_path):
    s = Sweep(name="t", base=dict(TINY_CPU), space={"train.lr": loguniform(1e-4, 1e-2)}, num_samples=4)
    rs = resolve(s, "t.py")
    ledger = Ledger()
    searcher = make_searcher(rs, tmp_path, ledger=ledger)
    for tid in ("a", "b", "c", "d"):
        searcher.suggest(tid)
    ledger.decisions.stopped("b", 512)
    searcher.on_trial_complete("a", {"val_loss": 3.0, "status": "ok"})
    searcher.on_trial_complete("b", {"val_loss": 3.5, "status": "running"})
    searcher.on_trial_complete("c", {"val_loss": 2.0, "status": "oom"})
    searcher.on_trial_complete("d", {"val_loss": float("nan"), "status": "diverged"})
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    got = {t.user_attrs["trial_id"]: (t.state.name, t.value, t.user_attrs["status"]) for t in study.trials}
    assert got == {"a": ("COMPLETE", 3.0, "ok"), "b": ("PRUNED", None, "pruned"), "c": ("FAIL", None, "oom"),
                   "d": ("FAIL", None, "diverged")}


def test_asha_budget_and_results_dir_names(tmp_path):
    s = Sweep(name="a", base={**TINY_CPU, "train.steps": 30}, scheduler="asha",
              space={"train.micro_batch_size": grid([8, 16])})
    rs = resolve(s, "a.py")
    assert max_tokens(rs) == 30 * 16 * 64
    asha = make_scheduler(rs, Ledger())
    assert asha._time_attr == "tokens" and not asha._stop_last_trials
    assert re.fullmatch(r"1-x-\d{8}-\d{6}-\d{6}", group_name(1, "x"))  # like the phase-0 study's W&B groups
    (tmp_path / "2-a-20260101-000000-000001").mkdir()
    (tmp_path / "10-a-20260102-000000-000001").mkdir()
    (tmp_path / "3-ab-20260101-000000-000001").mkdir()
    assert [p.name for p in runs_of(tmp_path, "a")] == ["2-a-20260101-000000-000001", "10-a-20260102-000000-000001"]


def test_define_by_run_searcher_suggests_and_survives_a_snapshot(tmp_path):
    """Tune snapshots the searcher with the experiment (and restores it on --resume)."""

    def space(trial):
        if trial.suggest_categorical("train.optimizer", ["adamw", "sgd"]) == "sgd":
            trial.suggest_float("train.momentum", 0.8, 0.99)
        return {"train.lr": 2e-3}

    s = Sweep(name="dbr", base=dict(TINY_CPU), space={"model.norm_placement": grid(["pre", "post"])},
              define_by_run=space, num_samples=2)
    rs = resolve(s, "dbr.py")
    searcher = make_searcher(rs, tmp_path)
    first = searcher.suggest("t1")
    assert first["model.norm_placement"] == "pre" and first["train.lr"] == 2e-3
    assert set(first) >= {"model.norm_placement", "train.optimizer", "train.lr"}
    searcher.save(str(tmp_path / "searcher.pkl"))
    (tmp_path / "other").mkdir()
    again = make_searcher(rs, tmp_path / "other")
    again.restore(str(tmp_path / "searcher.pkl"))
    assert "t1" in again._ot_trials
    assert again.suggest("t2")["model.norm_placement"] == "post"


def test_restored_searcher_requeues_a_point_asked_after_the_snapshot(tmp_path):
    """A driver killed between asking the study for a trial and snapshotting the searcher: on restore the
    orphan RUNNING trial is closed as interrupted and its grid point is the next one suggested."""
    s = Sweep(name="orphan", base=dict(TINY_CPU), space={"train.lr": grid([1e-3, 2e-3, 3e-3])})
    rs = resolve(s, "orphan.py")
    searcher = make_searcher(rs, tmp_path)
    first = searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"val_loss": 3.0, "status": "ok"})
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune's snapshot
    orphan = searcher.suggest("t2")  # asked (written to optuna.db) after the snapshot; then the driver dies
    assert orphan != first

    restored = make_searcher(rs, tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    requeue_orphans(restored, {"t1"})  # what Tune restored: t1 (lmtune.sweep.resume, before the first suggestion)
    study = optuna.load_study(study_name="orphan", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [(t.state, t.user_attrs.get("status")) for t in study.trials]
    assert states[:2] == [(optuna.trial.TrialState.COMPLETE, "ok"), (optuna.trial.TrialState.FAIL, "interrupted")]
    assert restored.suggest("t3") == orphan  # the interrupted point runs next,
    last = restored.suggest("t4")
    assert {first["train.lr"], orphan["train.lr"], last["train.lr"]} == {1e-3, 2e-3, 3e-3}  # then the rest of the grid


def test_a_driver_killed_inside_optunas_ask_leaves_a_point_the_resume_requeues_whole(tmp_path):
    """Killed after Study.ask created its trial but before it wrote the params (seen in CI: the resumed grid
    sweep then died with GridSampler's "All parameters must be specified …"): the requeued point is the grid
    point the trial was given; for a requeued trial killed the same way, the point it was enqueued with."""
    s = Sweep(name="ask", base=dict(TINY_CPU), space={"train.lr": grid([1e-3, 2e-3, 3e-3, 4e-3])})
    rs = resolve(s, "ask.py")
    searcher = make_searcher(rs, tmp_path)
    searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"val_loss": 3.0, "status": "ok"})
    searcher.save(str(tmp_path / "searcher.pkl"))  # the snapshot every resume below restores

    def killed_inside_ask(search, before_sampler: bool = False) -> float | None:
        study = search.study
        waiting = study._pop_waiting_trial_id()  # what Study.ask does first: an enqueued trial, else a new one,
        trial = waiting if waiting is not None else study._storage.create_new_trial(study._study_id)
        if not before_sampler:
            study.sampler.before_trial(study, study._storage.get_trial(trial))  # then the sampler's set-up; killed
        frozen = study._storage.get_trial(trial)
        assert frozen.params == {}
        fixed = frozen.system_attrs.get("fixed_params") or (
            compat.grid_point(study.sampler, frozen.system_attrs["grid_id"]) if "grid_id" in frozen.system_attrs else {})
        return fixed.get("train.lr")

    def resumed():
        search = make_searcher(rs, tmp_path)
        search.restore(str(tmp_path / "searcher.pkl"))
        requeue_orphans(search, {"t1"})
        return search

    # Killed before the sampler gave the new trial a point (seen in the kill-anywhere test: enqueued empty, the
    # point was refused by GridSampler): closed, nothing requeued, no grid point taken.
    killed_inside_ask(searcher, before_sampler=True)
    given = killed_inside_ask(resumed())  # the resume's first ask: a new trial, given a grid point; killed
    assert killed_inside_ask(resumed()) == given  # the next resume's first ask takes that point, requeued; killed again
    last = resumed()
    again = [last.suggest(f"r{i}")["train.lr"] for i in range(3)]
    assert again[0] == given  # the interrupted point, whole,
    assert sorted(again) == [2e-3, 3e-3, 4e-3]  # then the rest of the grid


def test_restarted_trial_reports_replace_the_steps_it_repeats(tmp_path):
    import json

    from lmtune.sweep.resume import drop_reports_from

    path = tmp_path / "metrics.jsonl"
    reports = [{"step": 5, "loss": 4.0}, {"step": 10, "loss": 3.5}, {"step": 10, "val_loss": 3.6},
               {"step": 15, "loss": 3.2}, {"step": 20, "loss": 3.1}]

    def write(lines):
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))

    def read():
        return [json.loads(line) for line in path.read_text().splitlines()]

    write(reports)
    drop_reports_from(path, {"step": 10, "val_loss": 3.6})  # resumed from step 10: its checkpoint's report first
    assert read() == reports[:2]  # the step-10 training report stays; the eval report comes again, then 15, …
    write(reports[:2])  # the interruption came before the driver heard the step-10 eval report at all
    drop_reports_from(path, {"step": 10, "val_loss": 3.6})
    assert read() == reports[:2]
    write(reports)
    drop_reports_from(path, {"step": 5, "loss": 4.1})  # restarted from scratch
    assert path.read_text() == ""


def _suggestions(rs, results_dir, n=6):
    """n suggestions of a fresh searcher, each told a value that depends only on the point (as a real run's)."""
    results_dir.mkdir()
    searcher = make_searcher(rs, results_dir)
    out = []
    for i in range(n):
        point = searcher.suggest(f"t{i}")
        out.append(point)
        searcher.on_trial_complete(f"t{i}", {"val_loss": 1.0 + abs(point["train.lr"] - 3e-3) * 100, "status": "ok"})
    return out


def test_seeded_search_repeats_its_suggestions(tmp_path):
    """Same sweep, same seed: the same trials in the same order; another seed: other trials."""
    s = Sweep(name="s", base=dict(TINY_CPU), space={"train.lr": loguniform(1e-4, 1e-2)}, num_samples=6, seed=3)
    first = _suggestions(resolve(s, "s.py"), tmp_path / "a")
    again = _suggestions(resolve(s, "s.py"), tmp_path / "b")
    other = _suggestions(resolve(Sweep(**{**s.__dict__, "seed": 4}), "s.py"), tmp_path / "c")
    assert first == again
    assert first[0] == other[0] == {"train.lr": 6e-4}  # the locked default goes first either way
    assert first[1:] != other[1:]


class _Trial:
    """A restored Tune trial as the reconciler sees it."""

    def __init__(self, trial_id, config, finished):
        self.trial_id, self.config, self._finished = trial_id, config, finished

    def is_finished(self):
        return self._finished


def test_resume_reconciles_the_limiter_and_the_study_with_what_tune_restored(tmp_path):
    """A snapshot whose searcher state disagrees with Tune's restored trials (the driver died between the two
    writes): the concurrency limiter's live set is rebuilt from the restored unfinished trials (a stale entry
    would block --max-concurrent 1 forever), a restored trial missing from the searcher's map gets its study
    trial back by its trial_id attribute, a study trial asked after the snapshot is requeued, and the search
    generator's count of trials made is the restored experiment's (a saved count of 4, the sweep's num_samples,
    would end the sweep with two of its points never run)."""
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator

    from lmtune.sweep.resume import Reconciler

    s = Sweep(name="rec", base=dict(TINY_CPU), space={"train.lr": grid([1e-3, 2e-3, 3e-3, 4e-3])})
    rs = resolve(s, "rec.py")
    searcher = make_searcher(rs, tmp_path)
    a = searcher.suggest("ra")
    searcher.on_trial_complete("ra", {"val_loss": 3.0, "status": "ok"})
    b = searcher.suggest("rb")  # running at the kill
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.suggest("rc")  # asked after the snapshot: an orphan
    restored = make_searcher(rs, tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    del restored._ot_trials["rb"]  # the saved map lacks b (saved before b was asked, say)
    limiter = ConcurrencyLimiter(restored, max_concurrent=1)
    limiter.live_trials = {"rghost"}  # a trial the restored experiment does not have
    generator = SearchGenerator(limiter)
    generator._total_samples = generator._counter = 4  # searcher state saved after the experiment state restored

    class Controller:
        _search_alg = generator

    rec = Reconciler()
    rec.on_restored_trial(Controller, _Trial("ra", a, finished=True))
    rec.on_restored_trial(Controller, _Trial("rb", b, finished=False))
    rec.after_restore()
    assert generator._counter == 2 and not generator.is_finished()
    assert limiter.live_trials == {"rb"}
    assert restored._ot_trials["rb"].params == b
    limiter.on_trial_complete("rb", {"val_loss": 2.0, "status": "ok"})
    assert limiter.live_trials == set()
    nxt = limiter.suggest("rd")  # the orphan's point (c's) runs next, then the rest of the grid
    assert nxt is not None and nxt["train.lr"] not in (a["train.lr"], b["train.lr"])
    study = optuna.load_study(study_name="rec", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    by_id = {t.user_attrs.get("trial_id"): t for t in study.trials if t.user_attrs.get("trial_id")}
    assert by_id["rb"].state == optuna.trial.TrialState.COMPLETE and by_id["rb"].value == 2.0
    assert by_id["rc"].state == optuna.trial.TrialState.FAIL and by_id["rc"].user_attrs["status"] == "interrupted"


def test_resume_reconciles_a_frontier_plan_with_the_trials_tune_restored_and_trials_csv(tmp_path):
    """A frontier sweep resumed from an experiment state newer than its searcher state (the searcher's file cut
    short, an older session's taken): the plan's pending trial had ended (its row is in trials.csv) and Tune
    restored the next one running. The plan takes both, so it neither launches that point again (two rows for one
    grid point) nor waits for a result that never comes; a planner's row in trials.csv is no trial. A plan whose
    trial no restored snapshot has, with nothing restored at all, gives it up and plans its point again."""
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator

    from lmtune.results.layout import csv_columns, write_trials_csv
    from lmtune.sweep.resume import Reconciler
    from lmtune.sweep.spec import Frontier

    x, b = "train.micro_batch_size", "train.ac_budget"
    s = Sweep(name="fr", base=dict(TINY_CPU), space={x: grid([2, 4, 8, 16]), b: grid([1.0])}, searcher="frontier",
              frontier=Frontier(headroom_gib=0.0), metric="tokens_per_s", mode="max")
    rs = resolve(s, "fr.py")

    def searcher_at(n_done: int):
        searcher = make_searcher(rs, tmp_path, limit_gib=1.0)
        points = []
        for n in range(n_done + 1):
            points.append(searcher.suggest(f"f{n}"))
            if n < n_done:
                searcher.on_trial_complete(f"f{n}", {"status": "ok", "peak_reserved_gib": 0.1, "tokens_per_s": 9.0})
        return searcher, points

    searcher, points = searcher_at(0)  # the saved plan: f0 running
    ended = {"trial_id": "f0", "status": "ok", "source": "run", **points[0], "peak_reserved_gib": 0.1,
             "tokens_per_s": 9.0}
    ahead, more = searcher_at(1)  # what the driver did after that save: f0 ended, f1 started
    implied = {"trial_id": "implied-001", "status": "oom", "source": "implied", b: 1.0, x: 16}
    write_trials_csv(tmp_path / "trials.csv", csv_columns([x, b]), [ended, implied])

    class Controller:
        _search_alg = SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=1))

    rec = Reconciler(results_dir=tmp_path)
    rec.searcher = searcher
    rec.on_restored_trial(Controller, _Trial("f0", points[0], finished=True))
    rec.on_restored_trial(Controller, _Trial("f1", more[1], finished=False))
    rec.after_restore()
    assert searcher.plan.launch_predictions().keys() == {"f0", "f1"}
    assert searcher.suggest("f2") is None  # f1's point is running: the plan waits for it, not launches it again
    for same in (searcher, ahead):
        same.on_trial_complete("f1", {"status": "ok", "peak_reserved_gib": 0.2, "tokens_per_s": 9.5})
    assert ahead.suggest("g") == searcher.suggest("f3")  # and goes on as the uninterrupted plan does
    assert ahead.implied_rows() == searcher.implied_rows()

    lost, points = searcher_at(0)
    (tmp_path / "trials.csv").unlink()
    rec = Reconciler(results_dir=tmp_path)
    rec.searcher = lost
    rec.after_restore()  # nothing restored: no controller ever seen
    assert lost.suggest("g0") == points[0]


def test_resume_sets_aside_a_snapshot_the_interruption_cut_short(tmp_path):
    """Tune copies its snapshot into the storage file by file: a driver killed during the copy leaves the newest
    session's files cut short or missing. The newest session with a whole experiment state is resumed; newer
    files and cut-short ones are set aside, nothing is deleted, and the console says so in one line."""
    import io
    import pickle

    from lmtune.sweep.snapshot import CUT_SHORT, repair_snapshot

    whole_json, whole_pkl = b'{"trial_data": []}', pickle.dumps({"counter": 2, "state": "x" * 5000})

    def write(files: dict[str, bytes]) -> None:
        for f in tmp_path.iterdir():
            f.unlink()
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)

    def repaired() -> tuple[list[str], str]:
        out = io.StringIO()
        repair_snapshot(str(tmp_path), out)
        return sorted(p.name for p in tmp_path.iterdir()), out.getvalue()

    s1, s2 = "2026-12-01_10-00-00", "2026-12-01_10-05-00"
    # the experiment state of the newest session cut short, its search state whole: both set aside
    write({f"experiment_state-{s1}.json": whole_json, f"search_gen_state-{s1}.json": whole_pkl,
           f"experiment_state-{s2}.json": whole_json[:7], f"search_gen_state-{s2}.json": whole_pkl,
           "tuner.pkl": whole_pkl})
    names, said = repaired()
    assert names == sorted([f"experiment_state-{s1}.json", f"search_gen_state-{s1}.json", "tuner.pkl",
                            f"experiment_state-{s2}.json{CUT_SHORT}", f"search_gen_state-{s2}.json{CUT_SHORT}"])
    assert len(said.splitlines()) == 1 and f"resuming from the whole one of session {s1}" in said
    # a whole newest experiment state with its searcher state cut at 4096 bytes (seen) and an older one emptied
    # by the same interrupted copy: the newest whole searcher state is the one left for Tune
    s0 = "2026-12-01_09-55-00"
    write({f"experiment_state-{s1}.json": whole_json, f"searcher-state-{s0}.pkl": whole_pkl,
           f"searcher-state-{s1}.pkl": b"", f"experiment_state-{s2}.json": whole_json,
           f"searcher-state-{s2}.pkl": whole_pkl[:4096], f"callback-states-{s2}.pkl": whole_pkl})
    names, said = repaired()
    assert {f"searcher-state-{s2}.pkl{CUT_SHORT}", f"searcher-state-{s1}.pkl{CUT_SHORT}", f"searcher-state-{s0}.pkl",
            f"callback-states-{s2}.pkl", f"experiment_state-{s2}.json"} == set(names) - {f"experiment_state-{s1}.json"}
    assert len(said.splitlines()) == 1
    # a whole snapshot: nothing moves, nothing is said
    write({f"experiment_state-{s2}.json": whole_json, f"search_gen_state-{s2}.json": whole_pkl})
    assert repaired() == (sorted([f"experiment_state-{s2}.json", f"search_gen_state-{s2}.json"]), "")


def test_memory_is_a_constraint_the_study_records_and_an_oom_is_infeasible_not_failed(tmp_path):
    """ok and OOM trials both become COMPLETE with memory_gib = peak − (limit − headroom): the samplers model
    feasibility (Optuna's samplers leave FAIL trials out). An OOM's objective is neutral (the worst feasible value
    so far), marked as such; a diverged trial stays FAIL."""
    s = Sweep(name="mem", base={**TINY_CPU, "system.memory_limit_gib": 2.0},
              space={"train.micro_batch_size": randint(1, 64)}, num_samples=4)
    rs = resolve(s, "mem.py")
    searcher = make_searcher(rs, tmp_path, limit_gib=2.0)
    for tid in ("m1", "m2", "m3", "m4"):
        searcher.suggest(tid)
    searcher.on_trial_complete("m1", {"val_loss": 3.0, "status": "ok", "peak_reserved_gib": 1.5})
    searcher.on_trial_complete("m2", {"val_loss": 2.5, "status": "ok", "peak_reserved_gib": 1.0})
    searcher.on_trial_complete("m3", {"status": "oom", "peak_reserved_gib": 2.1})
    searcher.on_trial_complete("m4", {"val_loss": float("nan"), "status": "diverged", "peak_reserved_gib": 1.2})
    study = optuna.load_study(study_name="mem", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    got = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert got["m1"].state.name == "COMPLETE" and got["m1"].constraints == {"memory_gib": pytest.approx(-0.5)}
    assert got["m2"].constraints == {"memory_gib": pytest.approx(-1.0)}
    oom = got["m3"]
    assert oom.state.name == "COMPLETE" and oom.user_attrs["status"] == "oom"
    assert oom.constraints["memory_gib"] > 0 and oom.value == 3.0  # neutral: the worst feasible value so far
    assert oom.user_attrs["objective"].startswith("neutral")
    assert got["m4"].state.name == "FAIL" and not got["m4"].constraints
    # The sampler sees the OOM as infeasible, not as a good value.
    from optuna.samplers._tpe.sampler import _get_infeasible_trial_score

    assert _get_infeasible_trial_score(oom) > 0 and _get_infeasible_trial_score(got["m2"]) == 0


def test_an_untested_ray_or_optuna_is_refused_in_one_line(monkeypatch):
    """lmtune/sweep/compat.py reaches into Ray's and Optuna's private parts: a version outside the range they were
    read in is refused before a sweep starts (exit 2 at the command line), unless the user says to go on."""
    from lmtune.config import ConfigError
    from lmtune.sweep import compat

    compat.check_versions()  # the installed ones (pyproject.toml pins the tested range)
    compat.check_versions({"ray": (2, 60), "optuna": (5, 0)})
    with pytest.raises(ConfigError) as e:
        compat.check_versions({"ray": (2, 61), "optuna": (5, 0)})
    message = str(e.value)
    assert "ray 2.61" in message and ">= 2.60, < 2.61" in message and compat.UNTESTED_ENV in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="optuna 6.0"):
        compat.check_versions({"ray": (2, 60), "optuna": (6, 0)})
    monkeypatch.setenv(compat.UNTESTED_ENV, "1")
    compat.check_versions({"ray": (3, 0), "optuna": (6, 0)})


def test_a_new_kind_of_axis_is_one_class(tmp_path, monkeypatch):
    """Everything lmtune asks of an axis (values, bounds, membership, JSON, Optuna, checks) is the domain's own: a kind
    defined here, and nowhere else, resolves, validates, sizes ASHA and the validation text, and is searched."""
    from dataclasses import dataclass

    from lmtune import config as config_lib
    from lmtune.config import ConfigError
    from lmtune.sweep.checks import same_validation_text
    from lmtune.sweep.domains import Domain, accepted_domains

    monkeypatch.setattr(Domain, "made", list(Domain.made))  # the kind below is this test's alone

    @dataclass(frozen=True)
    class Powers(Domain):
        """Powers of two from 2**low to 2**high, a categorical."""

        kind: ClassVar[str] = "powers"
        spelled: ClassVar[str] = "powers(a, b)"
        low: int
        high: int

        def listed(self):
            return tuple(2 ** i for i in range(self.low, self.high + 1))

        def largest(self):
            return 2 ** self.high

        def contains(self, value):
            return type(value) is int and value in self.listed()

        def to_json(self):
            return {"type": self.kind, "low": self.low, "high": self.high}

        def distribution(self):
            return optuna.distributions.CategoricalDistribution(list(self.listed()))

        def suggest(self, trial, key):
            return trial.suggest_categorical(key, list(self.listed()))

        def checked(self, key):
            for v in self.listed():
                config_lib.coerce(key, v)
            return self

    assert accepted_domains().endswith("randint(a, b) or powers(a, b)")
    s = Sweep(name="pw", base={**TINY_CPU, "train.steps": 30}, space={"train.micro_batch_size": Powers(1, 4)},
              num_samples=3, scheduler="asha")
    rs = resolve(s, "pw.py")
    assert rs.space_json() == {"train.micro_batch_size": {"type": "powers", "low": 1, "high": 4}}
    assert rs.defaults_point() == {"train.micro_batch_size": 8}  # TINY_CPU's micro-batch lies in it: tried first
    assert max_tokens(rs) == 30 * 16 * 64
    assert rs.base["train.eval_sequences"] == TINY_CPU["train.eval_batches"] * 16
    overrides = {"train.eval_batches": 2}
    assert same_validation_text(rs.space, overrides, 2) == {"train.eval_sequences": 2 * 16 * 2}
    assert overrides == {"train.eval_batches": 2}  # a check does not change what it checks
    searcher = make_searcher(rs, tmp_path)
    got = [searcher.suggest(f"p{i}")["train.micro_batch_size"] for i in range(3)]
    assert got[0] == 8 and set(got) <= {2, 4, 8, 16}
    with pytest.raises(ConfigError, match="powers"):
        resolve(Sweep(name="pw", base=dict(TINY_CPU), space={"train.micro_batch_size": 3}), "pw.py")


def test_a_new_searcher_is_one_registered_kind(tmp_path, monkeypatch):
    """A kind of searcher registered here, and nowhere else, is one a sweep may name: resolved, counted, built,
    its study told; a name no kind has is refused with the names there are."""
    from lmtune.config import ConfigError
    from lmtune.sweep import searchers

    monkeypatch.setattr(searchers, "SEARCHERS", dict(searchers.SEARCHERS))  # the kind below is this test's alone

    @searchers.register
    class RandomKind(searchers.OptunaKind):
        name = "random"

        def sampler(self, rs):
            return optuna.samplers.RandomSampler(seed=rs.sweep.seed)

    rs = resolve(Sweep(name="r", base=dict(TINY_CPU), space={"train.lr": loguniform(1e-4, 1e-2)}, searcher="random",
                       num_samples=3), "r.py")
    assert rs.searcher_text == "random" and rs.num_trials == 3 and searchers.kind_of(rs).keeps_study
    searcher = make_searcher(rs, tmp_path)
    assert isinstance(searcher.study.sampler, optuna.samplers.RandomSampler)
    assert searcher.suggest("r1") == {"train.lr": 6e-4}  # the locked default first, as with any study
    searcher.on_trial_complete("r1", {"val_loss": 3.0, "status": "ok"})
    assert optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials[0].value == 3.0
    with pytest.raises(ConfigError, match="expected one of 'tpe', 'grid', 'nsga2', 'frontier', 'random'"):
        resolve(Sweep(name="r", base=dict(TINY_CPU), space={"train.lr": loguniform(1e-4, 1e-2)}, searcher="gp"), "r.py")


def test_asha_saves_its_rungs_in_tunes_snapshot_through_its_own_callback(tmp_path):
    """Tune saves no scheduler state with its experiment; ASHA's rungs travel in the callbacks' file of the same
    snapshot (Tune's CallbackList saves and restores it) and a restored ASHA knows the trials with their rungs."""
    from ray.tune.callback import CallbackList

    s = Sweep(name="r", base={**TINY_CPU, "train.steps": 30}, scheduler="asha", grace_tokens=64,
              space={"train.lr": grid([1e-3, 2e-3])})
    rs = resolve(s, "r.py")

    class Trial:
        def __init__(self, trial_id):
            self.trial_id, self.config = trial_id, {}

    asha = make_scheduler(rs, Ledger())
    for tid, loss in (("a", 3.0), ("b", 4.0)):
        asha.on_trial_add(None, Trial(tid))
        asha.on_trial_result(None, Trial(tid), {"tokens": 64, "val_loss": loss, "status": "running"})
    CallbackList(asha.callbacks()).save_to_dir(str(tmp_path), session_str="s1")
    restored = make_scheduler(rs, Ledger())
    CallbackList(restored.callbacks()).restore_from_dir(str(tmp_path))
    assert compat.asha_knows(restored, "a") and compat.asha_knows(restored, "b")
    assert restored.get_state()["trial_info"] == asha.get_state()["trial_info"]
    def rungs(scheduler):
        return [recorded for b in scheduler._brackets for _, recorded in b._rungs]

    assert rungs(restored) == rungs(asha) and any(rungs(asha))


def _asha_rungs_64_128_256():
    return resolve(Sweep(name="r", base={**TINY_CPU, "train.steps": 30}, scheduler="asha", grace_tokens=64,
                         reduction_factor=2, space={"train.lr": grid([1e-3, 2e-3])}), "r.py")


def test_a_report_sent_again_by_a_restarted_trial_gets_the_decision_it_got_the_first_time(tmp_path):
    """A trial stopped at a rung, the driver killed before the stop took effect: the snapshot holds the rung's record,
    the resume restarts the trial from a checkpoint at or before that report, and the trial sends it again. ASHA
    stops it again, as the uninterrupted sweep did (it used to find the trial recorded and let it pass to the next
    rung). The same for a trial retried within one driver; a report it never sent before is judged as ever."""
    from ray.tune.callback import CallbackList
    from ray.tune.schedulers import TrialScheduler

    rs = _asha_rungs_64_128_256()

    def report(scheduler, tid, tokens, loss):
        result = {"tokens": tokens, "val_loss": loss, "status": "running"}
        return scheduler.on_trial_result(None, _Trial(tid, {}, finished=False), result)

    asha = make_scheduler(rs, Ledger())
    for tid in ("a", "b"):
        asha.on_trial_add(None, _Trial(tid, {}, finished=False))
    assert report(asha, "a", 64, 3.0) == report(asha, "a", 128, 2.0) == TrialScheduler.CONTINUE
    assert report(asha, "b", 64, 2.9) == TrialScheduler.CONTINUE  # better than a at 64: on to 128
    assert report(asha, "b", 128, 2.5) == TrialScheduler.STOP  # worse than a at 128
    CallbackList(asha.callbacks()).save_to_dir(str(tmp_path), session_str="s1")  # the snapshot; then the kill

    restored = make_scheduler(rs, Ledger())
    CallbackList(restored.callbacks()).restore_from_dir(str(tmp_path))
    # b resumes from its checkpoint at 64 and sends its reports again: the same decisions, and no other record
    assert report(restored, "b", 64, 2.9) == TrialScheduler.CONTINUE
    assert report(restored, "b", 128, 2.5) == TrialScheduler.STOP
    assert compat.asha_rungs_of(restored, "b") == {64, 128} and restored.ledger.decisions.pruned == {"b": 128}
    assert report(restored, "a", 192, 1.9) == TrialScheduler.CONTINUE  # a report it never sent: judged as ever
    # Within one driver: c passes 128 (better than the rung's median then), d records a better value there, and c,
    # retried from its checkpoint at 64 (its process lost), passes again, as it did: judged against d it would not.
    for tid in ("c", "d"):
        restored.on_trial_add(None, _Trial(tid, {}, finished=False))
    assert report(restored, "c", 64, 2.8) == report(restored, "c", 128, 2.1) == TrialScheduler.CONTINUE
    assert report(restored, "d", 64, 2.0) == report(restored, "d", 128, 1.5) == TrialScheduler.CONTINUE
    restored.on_trial_error(None, _Trial("c", {}, finished=False))
    assert report(restored, "c", 64, 2.8) == report(restored, "c", 128, 2.1) == TrialScheduler.CONTINUE


def test_a_finished_trial_replayed_after_a_resume_records_every_rung_it_reached(tmp_path):
    """The driver killed after a trial ended but before the next snapshot: the resume restarts the trial only to
    replay its final result. Its rungs come from all of its reports (metrics.jsonl), not only the last one (which
    records only the highest rung): a later trial is judged at the rungs below it as in the uninterrupted sweep
    (it used to find them empty and pass)."""
    from ray.tune.callback import CallbackList
    from ray.tune.schedulers import TrialScheduler

    from lmtune.contract import REPLAYED

    rs = _asha_rungs_64_128_256()
    reports = [{"step": i + 1, "tokens": t, "val_loss": v} for i, (t, v) in enumerate(
        [(64, 3.0), (128, 2.0), (256, 1.8), (300, 1.7)])]
    (tmp_path / "trials" / "a").mkdir(parents=True)
    (tmp_path / "trials" / "a" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reports))

    asha = make_scheduler(rs, Ledger(results_dir=tmp_path))
    for tid in ("a", "b"):
        asha.on_trial_add(None, _Trial(tid, {}, finished=False))
    asha.on_trial_result(None, _Trial("a", {}, finished=False), {**reports[0], "status": "running"})
    CallbackList(asha.callbacks()).save_to_dir(str(tmp_path), session_str="s1")  # a snapshot; `a` runs on, ends

    restored = make_scheduler(rs, Ledger(results_dir=tmp_path))
    CallbackList(restored.callbacks()).restore_from_dir(str(tmp_path))
    restored.on_trial_result(None, _Trial("a", {}, finished=False), {**reports[-1], "status": "ok", REPLAYED: True})
    assert compat.asha_rungs_of(restored, "a") == {64, 128, 256}
    # and when Tune hands the replayed result over only as the trial's last
    alone = make_scheduler(rs, Ledger(results_dir=tmp_path))
    CallbackList(alone.callbacks()).restore_from_dir(str(tmp_path))
    alone.on_trial_complete(None, _Trial("a", {}, finished=True), {**reports[-1], "status": "ok", REPLAYED: True})
    assert [sorted(r) for b in alone._brackets for _, r in b._rungs] == [
        sorted(r) for b in restored._brackets for _, r in b._rungs]
    assert restored.on_trial_result(None, _Trial("b", {}, finished=False), {"tokens": 64, "val_loss": 2.9}) == TrialScheduler.CONTINUE
    assert restored.on_trial_result(None, _Trial("b", {}, finished=False), {"tokens": 128, "val_loss": 2.5}) == TrialScheduler.STOP
