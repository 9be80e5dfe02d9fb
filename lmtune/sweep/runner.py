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

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from lmtune import config as config_lib
from lmtune.config import ConfigError
from lmtune.contract import LOG_DIR, STATUSES, SWEEP_JSON, TRAIN_DIR, TRIALS_CSV, TUNE_DIR
from lmtune.data.prepared import AUTO, auto_prepared
from lmtune.data.prepared import upload as upload_prepared
from lmtune.reporting import console
from lmtune.results.layout import new_results_dir, read_trials_csv, write_json
from lmtune.results.storage import resolve_storage, upload, uri_join
from lmtune.sweep import compat, snapshot
from lmtune.sweep.checks import check_placeable, worker_bundle
from lmtune.sweep.load import DEFAULT_SMOKE_SAMPLES, ResolvedSweep, resolve_gpus
from lmtune.sweep.record import check_same_sweep, device_memory, finished_at, mark_finished, sweep_json


@dataclass
class Outcome:
    results_dir: Path
    rows: list[dict[str, Any]]
    wall_s: float
    """Wall-clock of the Tune run (Tuner.fit), excluding Ray start-up."""
    time_in_trainer_s: dict[str, float] = field(default_factory=dict)
    """Per trial: from building the Trainer to the end of fit (reported by the trial)."""
    fit_start: float = 0.0
    """time.time() when Tuner.fit started."""
    trial_end: dict[str, float] = field(default_factory=dict)
    """Per trial: time.time() when the driver saw it end."""
    best: dict[str, Any] | None = None
    interrupted: bool = False
    """Stopped before the sweep's end (Ctrl-C or SIGTERM: Tune saved its state, ``--resume`` continues it)."""
    signal: int | None = None
    """The signal that stopped it when it was SIGTERM (``signal.SIGTERM``); None for Ctrl-C or no stop."""


# --- environment --------------------------------------------------------------------------------------


def _prepare_env(*, embedded: bool) -> dict[str, str]:
    """Environment every trial process must see; set here so an embedded Ray's workers inherit it."""
    from lmtune.training.reporting import wandb_mode

    if embedded and "ray" not in sys.modules and "RAY_AUTH_MODE" not in os.environ:
        # Ray enables token authentication for a new local cluster by default and says so on the console
        # unless the mode is set explicitly (read when ray is imported); the same default is set here so
        # that the console stays ours.
        os.environ["RAY_AUTH_MODE"] = "token"

    env = {
        # Metrics arrive at different intervals (val_loss only at evals); the metric names are checked
        # against the trainer's vocabulary before Ray starts (lmtune.sweep.load), so Tune need not.
        "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
        # Ray Train's controller polls its workers every 2 s by default: ~1 s per report and ~7 s of
        # teardown per trial on 2 CPUs (issue 3, point 8); 0.1 s brings both under a second.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"),
        # The console is ours: one line per trial event. Tune's tables and banners stay off (its logs
        # and per-trial output go to files), as do the warnings about forced experiment snapshots that
        # CheckpointConfig(num_to_keep) causes at every eval of a fast trial.
        "RAY_AIR_NEW_OUTPUT": "0",
        # The scheduler snapshots the experiment after every trial start, checkpoint and end (what --resume
        # restores, see lmtune.sweep.search); Tune would warn about "excessive" snapshots each time.
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
        # Multi-worker trials (Ray Train runs named train-{trial_id}) on the dashboard's Train page.
        "RAY_TRAIN_ENABLE_STATE_TRACKING": os.environ.get("RAY_TRAIN_ENABLE_STATE_TRACKING", "1"),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
    }
    if wandb_mode() == "offline":  # no API key: offline, never a prompt
        env["WANDB_MODE"] = "offline"
    os.environ.update(env)
    return env


def _log_to_files(log_dir: Path) -> logging.Handler:
    """Ray's and Tune's Python logging and warnings go to logs/driver.log, not the console."""
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / "driver.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # `import ray` gives "ray" and its library loggers (ray.tune, ray.train, …) console handlers of their
    # own; they are replaced by the file. tensorboardX (Tune's TensorBoard logger) warns on every NaN/inf
    # metric (a diverged trial's loss, a noise scale with no signal); that goes to the file too.
    names = {"ray", "ray.tune", "ray.train", "ray.air", "ray.data", "ray.serve", "ray.rllib", "py.warnings", "optuna",
             "tensorboardX", "lmtune"}
    names |= {n for n in logging.root.manager.loggerDict if n.startswith("ray.")
              and isinstance(logging.root.manager.loggerDict[n], logging.Logger)
              and logging.getLogger(n).handlers}
    for name in names:
        lg = logging.getLogger(name)
        lg.handlers = [h for h in lg.handlers if not isinstance(h, logging.StreamHandler)
                       or isinstance(h, logging.FileHandler)]
        lg.addHandler(handler)
        lg.propagate = False
        if name in ("ray", "lmtune", "optuna"):
            lg.setLevel(logging.INFO)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    # Files Tune leaves open at exit would be reported on the console after the log file is closed.
    warnings.filterwarnings("ignore", category=ResourceWarning)
    return handler


def _close_log(handler: logging.Handler) -> None:
    for name in [*logging.root.manager.loggerDict, "ray"]:
        lg = logging.getLogger(name)
        if handler in lg.handlers:
            lg.removeHandler(handler)
    handler.close()


def _free_port() -> int:
    """A port the OS hands out as free (on 127.0.0.1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ray(address: str | None, env: dict[str, str], log_dir: Path, out: TextIO, dashboard: bool = True) -> bool:
    """Start (or join) Ray; returns True when this process started the cluster. ``dashboard=False``: an embedded
    Ray without its dashboard (its head and nine module processes)."""
    import ray

    if ray.is_initialized():
        return False
    _cluster_messages_to_log()
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    if address:
        try:
            ctx = ray.init(address=address, runtime_env={"env_vars": env}, **kwargs)
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
            from lmtune.sweep.oom import first_line

            reason = first_line(e.__cause__ or e)
            hint = (" (the cluster uses token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or "
                    "~/.ray/auth_token as on the head)") if "auth" in reason.lower() else ""
            raise ConfigError(f"--address {address}: could not join the Ray cluster: {reason}{hint}") from None
    else:
        # Ray starts one idle worker process per CPU for the first driver; a sweep's trials are actors, each in
        # a process of its own, so on 2 CPUs those two imported Ray and waited, unused, until the end.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        # "local": a new instance of our own, always. Without it ray.init() joins whatever cluster RAY_ADDRESS or
        # the last `ray start` on this machine names (and hangs retrying a dead one's address).
        others = _other_clusters()
        os.environ.pop("RAY_ADDRESS", None)
        # Ray's state API finds its cluster the same way (Ray Train's placement-group cleaner asks it, at the end
        # of every multi-worker trial, whether the run's controller is alive): pointed at a dead cluster's
        # address it waits 40 s, and the trial's teardown 12 s. This instance's dashboard answers it at once,
        # so its address is chosen here, before the instance's processes start and inherit the variable. The port
        # is one the OS hands out: Ray's usual 8265 would race another Ray starting at the same moment (two sweeps,
        # parallel tests), and a dashboard given a port does not try the next one. Without a dashboard
        # (--no-dashboard) the address is set all the same: nothing listens there, so the state API is refused
        # at once instead of asking some other cluster.
        for attempt in range(5):
            port = _free_port()
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            try:
                with _apart_from_our_process_group():
                    ctx = ray.init(address="local", include_dashboard=dashboard, dashboard_port=port, **kwargs)
                break
            except ValueError as e:  # taken since it was found free (another Ray starting): another port
                if "already occupied" not in str(e) or attempt == 4:
                    raise
    url = getattr(ctx, "dashboard_url", None)
    if address:
        where = "joined the cluster at " + (ctx.address_info.get("gcs_address") or address)
    else:
        where = "embedded local Ray (a new instance" + (
            f"; not the Ray cluster{'s' if len(others) > 1 else ''} already running on this machine at "
            f"{', '.join(others)}: --address joins one)" if others else ")")
    token = " (it asks for the token that `ray get-auth-token` prints)" if url and os.environ.get(
        "RAY_AUTH_MODE", "").lower() == "token" else ""
    if url:
        shown = "http://" + url
    else:
        shown = "not running" if dashboard else "off (--no-dashboard)"
    print(f"ray: {where}; dashboard {shown}{token}", file=out)
    session = compat.session_dir() if not address else None
    if session is not None and (session / "logs").is_dir():
        link = log_dir / "ray-session"
        if not link.exists():
            link.symlink_to(session / "logs", target_is_directory=True)
    return not address


@contextlib.contextmanager
def _apart_from_our_process_group():
    """The embedded Ray's processes (GCS, raylet, their workers: the trials) start in a process group of their own.

    ``timeout`` stops a job by sending SIGTERM to its whole process group, as ``kill -- -PGID`` and some batch
    systems do. In the driver's group the GCS died of it at once, the trials with it, and the driver, whose SIGTERM
    takes Ctrl-C's path (:class:`_StopSignals`), waited 60 s for the dead GCS and was then ended by Ray without its
    state saved. Apart, only the driver gets the signal; it stops the trials and shuts its Ray down itself (and
    Ray's fate-sharing still ends those processes if the driver is killed outright). Ray already keeps its processes
    out of a terminal's Ctrl-C (they block SIGINT); SIGTERM cannot be blocked the same way, since Ray's own
    shutdown stops them with it.

    The driver moves into a new group while ``ray.init`` starts the processes (they inherit it) and back at once:
    it stays in the terminal's foreground group, so Ctrl-C and the terminal's own signals still reach it. A driver
    that leads its group already (a shell's job, ``setsid``) stays as it is: whoever signals its group means
    everything in it."""
    ours = os.getpgrp()
    if ours == os.getpid():
        yield
        return
    try:
        os.setpgid(0, 0)
    except OSError:  # not allowed here (a session leader): as above
        yield
        return
    try:
        yield
    finally:
        os.setpgid(0, ours)


class _StopSignals:
    """SIGTERM to the driver takes Ctrl-C's path while the sweep runs: Tune stops its trials, saves the experiment
    one last time and returns, and the command prints how to continue (exit 143). Tune handles SIGINT so but not
    SIGTERM, which Ray's handler turned into an exit with Ray's stack lines and no state saved; a batch system, a
    ``timeout`` and ``ray job stop`` all stop a job with SIGTERM.

    The handler calls whatever handles SIGINT when the signal comes: Tune's during ``Tuner.fit`` (a second signal
    then finds Python's own, as a second Ctrl-C does), Python's KeyboardInterrupt before and after it."""

    def __init__(self):
        self.received: int | None = None
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():  # signals are the main thread's (a test may not be)
            self._previous = signal.signal(signal.SIGTERM, self._on_term)
            self._installed = True
        return self

    def _on_term(self, signum: int, frame: Any) -> None:
        self.received = signum
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIGINT ignored or left to the system: the interrupt is ours to raise
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            # a handler set from C (Ray's core worker installs one) reads as None: the default takes its place
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)


def _check_placeable(rs: ResolvedSweep, address: str | None) -> str | None:
    """:func:`lmtune.sweep.checks.check_placeable` on this cluster's live nodes (and, for a joined cluster, its
    autoscaler's node types: this machine's embedded Ray grows no nodes)."""
    import ray

    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    if address is None:
        return check_placeable(worker_bundle(rs.cpus, rs.gpus), rs.sweep.workers, nodes, "this machine's embedded Ray")
    return check_placeable(worker_bundle(rs.cpus, rs.gpus), rs.sweep.workers, nodes, f"the one at --address {address}",
                           node_types=compat.autoscaler_node_types(), can_grow=True)


def _cluster_messages_to_log() -> None:
    """The cluster's error messages (a node marked dead, a worker killed, …) go to logs/driver.log, not the
    console. ``log_to_driver=False`` keeps the workers' output away, but every driver also gets a thread that
    prints the GCS's error messages to stdout as ``(raylet) …`` lines (:func:`lmtune.sweep.compat
    .redirect_cluster_messages`); the sweep reports what they mean to it per trial."""
    def to_log(data: dict, ignore_prefix: bool) -> None:
        log = logging.getLogger("ray")
        if not log.handlers:  # the sweep's log is closed (a message that comes as Ray shuts down): not the console
            return
        for line in data.get("lines") or []:
            log.warning("(%s) %s", data.get("pid"), line)

    compat.redirect_cluster_messages(to_log)


def _other_clusters() -> list[str]:
    """What an embedded Ray would otherwise have joined: RAY_ADDRESS, and the GCS of every Ray cluster running
    on this machine (live processes only: an address file left by a killed cluster does not count)."""
    found = [os.environ["RAY_ADDRESS"] + " (RAY_ADDRESS)"] if os.environ.get("RAY_ADDRESS") else []
    try:
        found += compat.running_clusters()
    except Exception:
        pass
    return found


# --- results directory --------------------------------------------------------------------------------


# --- the run ------------------------------------------------------------------------------------------


def run(
    rs: ResolvedSweep,
    *,
    address: str | None = None,
    storage: str = "results",
    resume: bool = False,
    max_concurrent: int | None = None,
    wandb: bool = True,
    ray_train: bool = False,
    render: bool = True,
    reuse_actors: bool | None = None,
    dashboard: bool = True,
    out: TextIO | None = None,
) -> Outcome:
    """Run (or with ``resume`` continue) the sweep; ``reuse_actors=None`` decides by :func:`measures_memory`."""
    out = out or sys.stdout
    compat.check_versions()  # before the cluster: an untested Ray or Optuna would break --resume silently
    local_root, remote = resolve_storage(storage)

    if resume:
        from lmtune.sweep.resume import find_resumable

        results_dir = find_resumable(local_root, rs.name, rs.smoke, remote)
        check_same_sweep(rs, results_dir)
    else:
        local_root.mkdir(parents=True, exist_ok=True)
        results_dir = new_results_dir(local_root, rs.name)
    group = results_dir.name
    base_uri = uri_join(remote, group) if remote else str(results_dir)
    if resume and finished_at(results_dir):  # nothing to continue: the table, without Ray's ~10 s start
        return _finished(rs, results_dir, base_uri, out)
    rs = _prepare_data(rs, local_root, remote, out)

    env = _prepare_env(embedded=address is None)
    handler = _log_to_files(results_dir / LOG_DIR)
    asked = rs.gpus
    started = False
    try:
        started = _start_ray(address, env, results_dir / LOG_DIR, out, dashboard=dashboard)
        import ray

        rs = replace(rs, gpus=resolve_gpus(rs.gpus, rs.base, ray.cluster_resources().get("GPU", 0)))
        placement_note = _check_placeable(rs, address)
    except ConfigError:
        if started:
            ray.shutdown()
        _close_log(handler)
        if not resume:  # nothing ran: leave no empty results directory behind
            import shutil

            shutil.rmtree(results_dir, ignore_errors=True)
        raise
    if not resume:
        write_json(results_dir / SWEEP_JSON, sweep_json(rs, results_dir))
    print(f"sweep {rs.name}{_smoke_label(rs)}: {rs.num_trials} trial(s), searcher {rs.searcher_text}, "
          f"scheduler {rs.sweep.scheduler}; results in {results_dir}{' (resumed)' if resume else ''}", file=out)
    print("each trial: " + console.trial_text(rs.base, _space_keys(rs)), file=out)
    print("trials: " + console.resources_text(cpus=rs.cpus, gpus=rs.gpus, workers=rs.sweep.workers, asked=asked,
                                              device=rs.base.get("system.device")), file=out)
    if placement_note:
        print(placement_note, file=out)
    with _StopSignals() as stop:
        try:
            outcome = _run_tune(rs, results_dir, base_uri, group=group, resume=resume, max_concurrent=max_concurrent,
                                wandb=wandb, ray_train=ray_train, render=render, remote=remote,
                                reuse_actors=reuse_actors, out=out)
        except KeyboardInterrupt:  # before Tune's loop took the signal over: nothing ran that a resume could continue
            raise StoppedEarly(stop.received or signal.SIGINT) from None
        finally:
            if started:
                import ray

                ray.shutdown()
            _close_log(handler)
    outcome.signal = stop.received
    return outcome


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
              max_concurrent: int | None, wandb: bool, ray_train: bool, render: bool, remote: str | None,
              reuse_actors: bool | None, out: TextIO) -> Outcome:
    from ray import tune

    from lmtune.sweep import resume as resume_protocol
    from lmtune.sweep.callback import ResultsWriter
    from lmtune.sweep.ledger import Ledger
    from lmtune.sweep.schedulers import make_scheduler
    from lmtune.sweep.trainable import TrialSettings, make_trainable, trial_resources

    ledger = Ledger()  # this run's decisions (scheduler, searcher and results writer share it)
    settings = TrialSettings(
        results_dir=str(results_dir), group=group, train_storage=uri_join(base_uri, TRAIN_DIR),
        workers=rs.sweep.workers, cpus=rs.cpus, gpus=rs.gpus, wandb=wandb, ray_train=ray_train,
    )
    trainable = tune.with_resources(make_trainable(settings), trial_resources(settings))
    space_keys = _space_keys(rs)
    # The searcher suggests the space's axes (the frontier planner requires them absent here); keys a
    # define-by-run function sets only in some branches keep their base value in the others.
    param_space = {k: v for k, v in rs.base.items() if k not in rs.space}
    tune_path = uri_join(base_uri, TUNE_DIR)
    if reuse_actors is None:
        reuse_actors = not measures_memory(rs)

    reconciler = None
    if resume:
        tuner, reconciler = resume_protocol.restore(tune_path, trainable=trainable, param_space=param_space,
                                                    ledger=ledger, results_dir=results_dir, out=out)
        # Tune restores them from its tuner.pkl (the writer) and its searcher snapshot (the searcher's state, into
        # this same object when the run starts)
        writer = next(cb for cb in compat.tuner_callbacks(tuner) if isinstance(cb, ResultsWriter))
        searcher = reconciler.searcher
    else:
        limit = rs.base.get("system.memory_limit_gib") or device_memory(rs).get("device_memory_gib")
        searcher = rs.kind.build(rs, results_dir, ledger=ledger, limit_gib=limit or None)
        writer = ResultsWriter(results_dir, space_keys, rs.metrics, rs.kind.total(rs.num_trials), ledger=ledger,
                               extra_columns=rs.kind.extra_columns, out=out, resources=worker_bundle(rs.cpus, rs.gpus),
                               workers=rs.sweep.workers)
        concurrency = max_concurrent or _default_concurrency(settings)
        scheduler = make_scheduler(rs, ledger)
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
    writer.planner = rs.kind.planner(searcher)  # the rows of the points it never launched, at every write of trials.csv
    snapshot.keep_tuner_file(tune_path)
    if resume and max_concurrent:
        print("note: --max-concurrent is fixed when a sweep starts; the resumed run keeps its value.", file=out)

    fit_start = time.time()
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

    # Ctrl-C ends Tune's loop early (the state is saved): trials left running or pending, or fewer than the
    # searcher meant to run. Tune may mark the trials it stopped TERMINATED, so its counts alone do not say; the
    # trials with a final result do (seen on a Slurm job's SIGTERM with every trial of a grid created: 6 of 8
    # finished, the sweep marked done).
    writer.write_csv()
    rows = read_trials_csv(results_dir / TRIALS_CSV)
    ended = sum(r.get("source", "run") == "run" and r.get("status") in STATUSES for r in rows)
    interrupted = (grid.num_terminated + grid.num_errors < len(grid)
                   or rs.kind.planned_more(searcher, min(len(grid), ended), rs.num_trials))
    if not interrupted:
        mark_finished(results_dir)
    best = console.print_summary(results_dir, rows, out, metrics=rs.metrics, modes=rs.modes, space_keys=space_keys,
                                 searcher=rs.searcher, frontier=rs.frontier, tune_dir=tune_path)
    if render:
        console.print_report(results_dir, out)
    if remote:
        upload(results_dir, base_uri)
        print(f"uploaded to {base_uri}", file=out)
    return Outcome(results_dir=results_dir, rows=rows, wall_s=wall, time_in_trainer_s=dict(writer.trainer_s), fit_start=fit_start,
                   trial_end=dict(writer.ended), best=best, interrupted=interrupted)


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
    return (rs.kind.fresh_processes or bool(rs.base.get("system.memory_limit_gib"))
            or "system.memory_limit_gib" in keys or any(m.startswith("peak_") for m in rs.metrics))


def _trial_name(trial) -> str:
    return trial.trial_id


def _space_keys(rs: ResolvedSweep) -> list[str]:
    keys = list(rs.space)
    keys += [k for k in rs.define_by_run_keys if k not in keys]
    return keys


def _default_concurrency(settings) -> int:
    """Trials in flight: what the cluster's CPUs/GPUs hold at the trial's resources (at least 1)."""
    import ray

    total = ray.cluster_resources()
    per_cpu = settings.cpus * (settings.workers if settings.use_ray_train else 1)
    n = int(total.get("CPU", 1) // max(per_cpu, 1e-9))
    if settings.gpus:
        per_gpu = settings.gpus * (settings.workers if settings.use_ray_train else 1)
        n = min(n, int(total.get("GPU", 0) // per_gpu))
    return max(1, n)


