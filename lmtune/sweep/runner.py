"""Run a resolved sweep on Ray Tune: cluster, results directory, searcher, scheduler, trials, resume.

The flow of :func:`run`:

1. results directory: a new ``{n}-{name}-{timestamp}`` under the storage, or with ``resume`` the latest
   run of this sweep there (same ``--smoke``), continued with ``Tuner.restore`` (finished trials are
   kept, unfinished ones continue from their last checkpoint, failed ones stay failed);
2. Ray: an embedded local cluster with the dashboard (its URL printed), or ``--address`` to join one;
   Ray's own output goes to ``logs/`` (driver log, worker logs via the session directory);
3. one Tune trial per config (:mod:`lmtune.sweep.trainable`), Optuna or the frontier planner
   suggesting configs, ASHA on ``tokens`` or FIFO, Tune-level retries for genuine errors only;
4. at the end: ``trials.csv`` complete (frontier sweeps add the points never launched), the table of
   trials and the best one on the console, ``lmtune.reporting.render`` for tables and plots.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from lmtune import config as config_lib
from lmtune.config import ConfigError
from lmtune.contract import LOG_DIR, REUSE_INDEX, STATUSES, SWEEP_JSON, TRAIN_DIR, TRIALS_CSV, TUNE_DIR
from lmtune.data.prepared import AUTO, auto_prepared
from lmtune.data.prepared import upload as upload_prepared
from lmtune.reporting import console
from lmtune.results.layout import a_trial, new_results_dir, read_trials_csv, write_json
from lmtune.results.storage import resolve_storage, upload, uri_join
from lmtune.sweep import cluster, compat, reuse, snapshot
from lmtune.sweep.checks import worker_bundle
from lmtune.sweep.load import DEFAULT_SMOKE_SAMPLES, resolve_gpus
from lmtune.sweep.record import check_same_sweep, device_memory, finished_at, mark_finished, sweep_json
from lmtune.sweep.resolved import ResolvedSweep
from lmtune.sweep.searchers import kind_of


@dataclass
class Outcome:
    results_dir: Path
    rows: list[dict[str, Any]]
    wall_s: float
    """Wall-clock of the Tune run (Tuner.fit), excluding Ray start-up."""
    best: dict[str, Any] | None = None
    interrupted: bool = False
    """Stopped before the sweep's end (Ctrl-C or SIGTERM: Tune saved its state, ``--resume`` continues it)."""
    signal: int | None = None
    """The signal that stopped it when it was SIGTERM (``signal.SIGTERM``); None for Ctrl-C or no stop."""


@dataclass
class Probe:
    """What the trial-overhead benchmark (benchmarks/trial_overhead.py) sets and reads; a sweep's command never
    passes one. In: Ray Train for a one-worker trial too, and whether Tune reuses trial processes (None: lmtune's
    choice, :func:`measures_memory`). Out: when ``Tuner.fit`` started and, per trial, when the driver saw it end
    and its time inside the trainer (from building it to the end of fit, reported by the trial)."""

    ray_train: bool = False
    reuse_actors: bool | None = None
    fit_start: float = 0.0
    trial_end: dict[str, float] = field(default_factory=dict)
    time_in_trainer_s: dict[str, float] = field(default_factory=dict)


# --- the run ------------------------------------------------------------------------------------------


def run(
    rs: ResolvedSweep,
    *,
    address: str | None = None,
    storage: str = "results",
    resume: bool = False,
    max_concurrent: int | None = None,
    wandb: bool = True,
    render: bool = True,
    dashboard: bool = True,
    rerun: bool = False,
    warm_start: list[Path] | None = None,
    out: TextIO | None = None,
    probe: Probe | None = None,
) -> Outcome:
    """Run (or with ``resume`` continue) the sweep. A trial the storage already holds finished (the same fingerprint:
    :mod:`lmtune.sweep.reuse`) is not trained again, unless ``rerun``; ``warm_start``: earlier sweeps' results
    directories whose finished trials seed the searcher's study."""
    out = out or sys.stdout
    compat.check_versions()  # before the cluster: an untested Ray or Optuna would break --resume silently
    local_root, remote = resolve_storage(storage)
    results_dir = _results_dir(rs, local_root, remote, resume)
    group = results_dir.name
    base_uri = uri_join(remote, group) if remote else str(results_dir)
    if resume and finished_at(results_dir):  # nothing to continue: the table, without Ray's ~10 s start
        return _finished(rs, results_dir, base_uri, out)
    rs = _prepare_data(rs, local_root, remote, out)

    env = cluster.prepare_env(embedded=address is None, dashboard=dashboard)
    handler = cluster.log_to_files(results_dir / LOG_DIR)
    asked = rs.gpus
    rs, started, placement_note = _on_cluster(rs, address, env, results_dir, handler, resume=resume, out=out,
                                              dashboard=dashboard)
    if not resume:
        write_json(results_dir / SWEEP_JSON, sweep_json(rs, results_dir))
    print(f"sweep {rs.name}{_smoke_label(rs)}: {rs.num_trials} trial(s), searcher {rs.searcher_text}, "
          f"scheduler {rs.sweep.scheduler}; results in {results_dir}{' (resumed)' if resume else ''}", file=out)
    print("each trial: " + console.trial_text(rs.base, _space_keys(rs)), file=out)
    print("trials: " + console.resources_text(cpus=rs.cpus, gpus=rs.gpus, workers=rs.sweep.workers, asked=asked,
                                              device=rs.base.get("system.device")), file=out)
    if placement_note:
        print(placement_note, file=out)
    with cluster.StopSignals() as stop:
        try:
            outcome = _run_tune(rs, results_dir, base_uri, group=group, resume=resume, max_concurrent=max_concurrent,
                                wandb=wandb, render=render, remote=remote, probe=probe or Probe(), rerun=rerun,
                                warm_start=warm_start or [], out=out)
        except KeyboardInterrupt:  # before Tune's loop took the signal over: nothing ran that a resume could continue
            raise StoppedEarly(stop.received or signal.SIGINT) from None
        finally:
            if started:
                import ray

                ray.shutdown()
            cluster.close_log(handler)
    outcome.signal = stop.received
    return outcome


def _results_dir(rs: ResolvedSweep, local_root: Path, remote: str | None, resume: bool) -> Path:
    """A new ``{n}-{name}-{timestamp}`` under the storage, or with ``resume`` this sweep's latest run there."""
    if resume:
        from lmtune.sweep.resume import find_resumable

        results_dir = find_resumable(local_root, rs.name, rs.smoke, remote)
        check_same_sweep(rs, results_dir)
        return results_dir
    local_root.mkdir(parents=True, exist_ok=True)
    return new_results_dir(local_root, rs.name)


def _on_cluster(rs: ResolvedSweep, address: str | None, env: dict[str, str], results_dir: Path,
                handler: logging.Handler, *, resume: bool, out: TextIO,
                dashboard: bool) -> tuple[ResolvedSweep, bool, str | None]:
    """Ray started (or joined), the sweep's GPUs resolved against it and its trials checked to fit on its nodes:
    the sweep, whether this process started Ray, and a note on placement. A ConfigError stops Ray again and
    leaves no empty results directory behind."""
    started = False
    try:
        started = cluster.start_ray(address, env, results_dir / LOG_DIR, out, dashboard=dashboard)
        import ray

        rs = replace(rs, gpus=resolve_gpus(rs.gpus, rs.base, ray.cluster_resources().get("GPU", 0)))
        return rs, started, cluster.placement_note(rs.cpus, rs.gpus, rs.sweep.workers, address)
    except ConfigError:
        if started:
            import ray

            ray.shutdown()
        cluster.close_log(handler)
        if not resume:  # nothing ran
            import shutil

            shutil.rmtree(results_dir, ignore_errors=True)
        raise


def _prepare_data(rs: ResolvedSweep, local_root: Path, remote: str | None, out: TextIO) -> ResolvedSweep:
    """``data.prepared=auto``: the driver prepares data.dataset once, into the storage's ``prepared/`` (uploaded there
    with a remote storage), before any trial; every trial then reads those shards and none tokenizes. Returns the
    sweep whose base names them."""
    if rs.base.get("data.prepared") != AUTO:
        return rs
    directory = auto_prepared(config_lib.from_flat(rs.base).data, local_root, out=out)
    where = str(directory)
    if remote:
        where = uri_join(remote, "prepared", directory.name)
        upload_prepared(directory, where)
    print(f"data: the trials read the shards prepared in {where}", file=out)
    return replace(rs, base={**rs.base, "data.prepared": where})


class StoppedEarly(Exception):
    """Ctrl-C or SIGTERM before the sweep's first trial (while Ray started or Tune set up): nothing to continue."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _finished(rs: ResolvedSweep, results_dir: Path, base_uri: str, out: TextIO) -> Outcome:
    """``--resume`` of a run that reached its end: say so, and show its table as the run ended."""
    print(f"resume: {results_dir} finished at {finished_at(results_dir)}; nothing to continue (Ray not started). "
          f"Run it again without --resume for a new run.", file=out)
    rows = read_trials_csv(results_dir / TRIALS_CSV)
    best = console.print_summary(results_dir, rows, out, metrics=rs.metrics, modes=rs.modes, space_keys=_space_keys(rs),
                                 searcher=rs.searcher, frontier=rs.frontier, tune_dir=uri_join(base_uri, TUNE_DIR))
    return Outcome(results_dir=results_dir, rows=rows, wall_s=0.0, best=best)


def _run_tune(rs: ResolvedSweep, results_dir: Path, base_uri: str, *, group: str, resume: bool,
              max_concurrent: int | None, wandb: bool, render: bool, remote: str | None, probe: Probe,
              rerun: bool, warm_start: list[Path], out: TextIO) -> Outcome:
    from ray import tune

    from lmtune.sweep import resume as resume_protocol
    from lmtune.sweep.callback import ResultsWriter
    from lmtune.sweep.ledger import Ledger
    from lmtune.sweep.trainable import TrialSettings, make_trainable, trial_resources

    ledger = Ledger(results_dir=results_dir)  # this run's decisions (scheduler, searcher and results writer share it)
    settings = TrialSettings(
        results_dir=str(results_dir), group=group, train_storage=uri_join(base_uri, TRAIN_DIR),
        workers=rs.sweep.workers, cpus=rs.cpus, gpus=rs.gpus, wandb=wandb, ray_train=probe.ray_train,
        reusable=reusable_trials(results_dir.parent, rerun, out),
    )
    trainable = tune.with_resources(make_trainable(settings), trial_resources(settings))
    # The searcher suggests the space's axes (the frontier planner requires them absent here); keys a
    # define-by-run function sets only in some branches keep their base value in the others.
    param_space = {k: v for k, v in rs.base.items() if k not in rs.space}
    tune_path = uri_join(base_uri, TUNE_DIR)

    reconciler = None
    if resume:
        tuner, reconciler = resume_protocol.restore(tune_path, trainable=trainable, param_space=param_space,
                                                    ledger=ledger, results_dir=results_dir, out=out)
        # Tune restores them from its tuner.pkl (the writer) and its searcher snapshot (the searcher's state, into
        # this same object when the run starts)
        writer = next(cb for cb in compat.tuner_callbacks(tuner) if isinstance(cb, ResultsWriter))
        searcher = reconciler.searcher
        if max_concurrent:
            print("note: --max-concurrent is fixed when a sweep starts; the resumed run keeps its value.", file=out)
    else:
        tuner, searcher, writer = _new_tuner(rs, results_dir, base_uri, trainable, param_space, ledger=ledger,
                                             concurrency=max_concurrent or cluster.default_concurrency(settings),
                                             probe=probe, out=out)
        if warm_start:
            reuse.warm_start(searcher, _space_keys(rs), warm_start, out)
    writer.planner = kind_of(rs).planner(searcher)  # the rows of the points it never launched, at every write of trials.csv
    snapshot.keep_tuner_file(tune_path)

    probe.fit_start = time.time()
    t0 = time.perf_counter()
    try:
        grid = tuner.fit()
    except Exception:
        if not (reconciler and reconciler.restore_failed):
            raise
    finally:
        if reconciler:
            reconciler.finish(results_dir)  # Tune could not restore: ConfigError, in one line
    wall = time.perf_counter() - t0
    took = ledger.pacing.took
    if took:
        logging.getLogger("lmtune").info(
            "experiment snapshots (trial added / checkpointed / ended): %d, %.2f s in all, longest %.3f s",
            len(took), sum(took), max(took))
    probe.trial_end, probe.time_in_trainer_s = dict(writer.ended), dict(writer.trainer_s)
    return _ended(rs, results_dir, base_uri, grid, searcher, writer, wall=wall, render=render, remote=remote, out=out)


def reusable_trials(root: Path, rerun: bool, out: TextIO) -> dict[str, dict[str, Any]]:
    """The storage's finished trials by fingerprint, with a line on what they are (none with ``rerun``)."""
    if rerun:
        print("reuse: --rerun: every trial trains (and is recorded for later sweeps)", file=out)
        return {}
    found = reuse.load(root, out)
    if found:
        print(f"reuse: {len(found)} finished trial(s) in {root / REUSE_INDEX}: a trial with the same fingerprint is "
              f"not trained again (--rerun trains every trial)", file=out)
    return found


def _new_tuner(rs: ResolvedSweep, results_dir: Path, base_uri: str, trainable: Any, param_space: dict[str, Any], *,
               ledger: Any, concurrency: int, probe: Probe, out: TextIO) -> tuple[Any, Any, Any]:
    """A new sweep's Tuner, with its searcher (the sweep's kind builds it) and its results writer."""
    from ray import tune

    from lmtune.sweep.callback import ResultsWriter
    from lmtune.sweep.schedulers import make_scheduler

    limit = rs.base.get("system.memory_limit_gib") or device_memory(rs).get("device_memory_gib")
    searcher = kind_of(rs).build(rs, results_dir, ledger=ledger, limit_gib=limit or None)
    writer = ResultsWriter(results_dir, _space_keys(rs), rs.metrics, kind_of(rs).total(rs.num_trials), ledger=ledger,
                           extra_columns=kind_of(rs).extra_columns, out=out, resources=worker_bundle(rs.cpus, rs.gpus),
                           workers=rs.sweep.workers)
    scheduler = make_scheduler(rs, ledger)
    reuse_actors = probe.reuse_actors if probe.reuse_actors is not None else not measures_memory(rs)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=rs.num_trials,
            max_concurrent_trials=concurrency, trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name, reuse_actors=reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=base_uri, callbacks=[writer, *scheduler.callbacks()], verbose=0,
            log_to_file=True,
            failure_config=tune.FailureConfig(max_failures=rs.sweep.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )
    return tuner, searcher, writer


def _ended(rs: ResolvedSweep, results_dir: Path, base_uri: str, grid: Any, searcher: Any, writer: Any, *,
           wall: float, render: bool, remote: str | None, out: TextIO) -> Outcome:
    """After Tune's loop: trials.csv complete, the run marked finished unless it was stopped, the console's table
    and the report, the results uploaded."""
    # Ctrl-C ends Tune's loop early (the state is saved): trials left running or pending, or fewer than the
    # searcher meant to run. Tune may mark the trials it stopped TERMINATED, so its counts alone do not say; the
    # trials with a final result do (seen on a Slurm job's SIGTERM with every trial of a grid created: 6 of 8
    # finished, the sweep marked done).
    writer.write_csv()
    rows = read_trials_csv(results_dir / TRIALS_CSV)
    ended = sum(a_trial(r) and r.get("status") in STATUSES for r in rows)
    interrupted = (grid.num_terminated + grid.num_errors < len(grid)
                   or kind_of(rs).planned_more(searcher, min(len(grid), ended), rs.num_trials))
    if not interrupted:
        mark_finished(results_dir)
    best = console.print_summary(results_dir, rows, out, metrics=rs.metrics, modes=rs.modes,
                                 space_keys=_space_keys(rs), searcher=rs.searcher, frontier=rs.frontier,
                                 tune_dir=uri_join(base_uri, TUNE_DIR))
    saved = reuse.saving_text(rows)
    if saved:
        print(saved, file=out)
    if render:
        console.print_report(results_dir, out)
    if remote:
        upload(results_dir, base_uri)
        print(f"uploaded to {base_uri}", file=out)
    return Outcome(results_dir=results_dir, rows=rows, wall_s=wall, best=best, interrupted=interrupted)


def _smoke_label(rs: ResolvedSweep) -> str:
    if not rs.smoke:
        return ""
    if rs.smoke_default:
        return (f" (smoke: the file has no smoke= variant, so lmtune's default: base TINY_CPU, at most "
                f"{DEFAULT_SMOKE_SAMPLES} sample(s) per grid point, the space's axes kept)")
    return " (smoke)"


def measures_memory(rs: ResolvedSweep) -> bool:
    """Whether the sweep is about memory: then every trial gets a fresh process.

    Otherwise Tune reuses trial processes between trials (``reuse_actors``): a new process costs ~2.5 s
    per trial on 2 CPUs (start, imports), a reused one ~0.1 s (BENCHMARKS.md). The trainable
    frees what the previous trial left (gc, ``malloc_trim``, the CUDA cache) before it starts, but a
    process's peak RSS and the allocator's state still carry some history, so a frontier, an emulated
    memory limit or a peak-memory metric is measured in fresh processes.
    """
    keys = set(rs.space) | set(rs.define_by_run_keys)
    return (kind_of(rs).fresh_processes or bool(rs.base.get("system.memory_limit_gib"))
            or "system.memory_limit_gib" in keys or any(m.startswith("peak_") for m in rs.metrics))


def _trial_name(trial) -> str:
    return trial.trial_id


def _space_keys(rs: ResolvedSweep) -> list[str]:
    keys = list(rs.space)
    keys += [k for k in rs.define_by_run_keys if k not in keys]
    return keys
