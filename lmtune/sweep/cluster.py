"""The sweep's Ray cluster as the driver sees it: the trials' environment, Ray's logs in files, starting an embedded
Ray (or joining one) with its one console line, SIGTERM taken as Ctrl-C, whether the trials fit on its nodes and
how many run at once. Ray is imported only when a function runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, TextIO

from lmtune.config import ConfigError
from lmtune.sweep import compat
from lmtune.sweep.checks import check_placeable, worker_bundle

# --- the trials' environment and the driver's logs ----------------------------------------------------


def prepare_env(*, embedded: bool, dashboard: bool = True) -> dict[str, str]:
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
        # Multi-worker trials (Ray Train runs named train-{trial_id}) on the dashboard's Train page: an actor
        # that keeps their state, for a dashboard to show. Without a dashboard nothing would read it.
        "RAY_TRAIN_ENABLE_STATE_TRACKING": os.environ.get("RAY_TRAIN_ENABLE_STATE_TRACKING",
                                                          "1" if dashboard or not embedded else "0"),
        # Ray Train watches each node of a multi-worker trial for a preemption notice (a cloud's spot node being
        # drained) from an actor of its own: on a cluster, where that happens. An embedded Ray is this machine.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
                                                              "0" if embedded else "1"),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
    }
    if wandb_mode() == "offline":  # no API key: offline, never a prompt
        env["WANDB_MODE"] = "offline"
    os.environ.update(env)
    return env


def log_to_files(log_dir: Path) -> logging.Handler:
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


def close_log(handler: logging.Handler) -> None:
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


def start_ray(address: str | None, env: dict[str, str], log_dir: Path, out: TextIO, dashboard: bool = True) -> bool:
    """Start (or join) Ray and say so in one line; returns True when this process started the cluster.
    ``dashboard=False``: an embedded Ray without its dashboard (its head and nine module processes)."""
    import ray

    if ray.is_initialized():
        return False
    _cluster_messages_to_log()
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    if address:
        ctx = _join(address, env, kwargs)
        where = "joined the cluster at " + (ctx.address_info.get("gcs_address") or address)
    else:
        # "local": a new instance of our own, always. Without it ray.init() joins whatever cluster RAY_ADDRESS or
        # the last `ray start` on this machine names (and hangs retrying a dead one's address).
        others = _other_clusters()
        ctx = _start_embedded(dashboard, kwargs)
        where = "embedded local Ray (a new instance" + (
            f"; not the Ray cluster{'s' if len(others) > 1 else ''} already running on this machine at "
            f"{', '.join(others)}: --address joins one)" if others else ")")
    url = getattr(ctx, "dashboard_url", None)
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


def _join(address: str, env: dict[str, str], kwargs: dict[str, Any]) -> Any:
    """``ray.init`` on a running cluster (its trials get ``env``); ConfigError in one line when it cannot."""
    import ray

    try:
        return ray.init(address=address, runtime_env={"env_vars": env}, **kwargs)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
        from lmtune.sweep.oom import first_line

        reason = first_line(e.__cause__ or e)
        hint = (" (the cluster uses token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or "
                "~/.ray/auth_token as on the head)") if "auth" in reason.lower() else ""
        raise ConfigError(f"--address {address}: could not join the Ray cluster: {reason}{hint}") from None


def _start_embedded(dashboard: bool, kwargs: dict[str, Any]) -> Any:
    """``ray.init`` of a new local instance of our own."""
    import ray

    # Ray starts one idle worker process per CPU for the first driver; a sweep's trials are actors, each in
    # a process of its own, so on 2 CPUs those two imported Ray and waited, unused, until the end.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    os.environ.pop("RAY_ADDRESS", None)
    # Ray's state API finds its cluster the same way (Ray Train's placement-group cleaner asks it, at the end
    # of every multi-worker trial, whether the run's controller is alive): pointed at a dead cluster's
    # address it waits 40 s, and the trial's teardown 12 s. This instance's dashboard answers it at once,
    # so its address is chosen here, before the instance's processes start and inherit the variable. The port
    # is one the OS hands out: Ray's usual 8265 would race another Ray starting at the same moment (two sweeps,
    # parallel tests), and a dashboard given a port does not try the next one. Without a dashboard
    # (--no-dashboard) the address is set all the same: nothing listens there, so the state API is refused
    # at once instead of asking some other cluster.
    tries = 5
    while True:
        tries -= 1
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        try:
            with _apart_from_our_process_group():
                return ray.init(address="local", include_dashboard=dashboard, dashboard_port=port, **kwargs)
        except ValueError as e:  # taken since it was found free (another Ray starting): another port
            if "already occupied" not in str(e) or not tries:
                raise


@contextlib.contextmanager
def _apart_from_our_process_group():
    """The embedded Ray's processes (GCS, raylet, their workers: the trials) start in a process group of their own.

    ``timeout`` stops a job by sending SIGTERM to its whole process group, as ``kill -- -PGID`` and some batch
    systems do. In the driver's group the GCS died of it at once, the trials with it, and the driver, whose SIGTERM
    takes Ctrl-C's path (:class:`StopSignals`), waited 60 s for the dead GCS and was then ended by Ray without its
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


class StopSignals:
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

    def __enter__(self) -> "StopSignals":
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


def placement_note(cpus: float, gpus: float, workers: int, address: str | None) -> str | None:
    """:func:`lmtune.sweep.checks.check_placeable` on this cluster's live nodes (and, for a joined cluster, its
    autoscaler's node types: this machine's embedded Ray grows no nodes)."""
    import ray

    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    if address is None:
        return check_placeable(worker_bundle(cpus, gpus), workers, nodes, "this machine's embedded Ray")
    return check_placeable(worker_bundle(cpus, gpus), workers, nodes, f"the one at --address {address}",
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


# --- how many trials at once ----------------------------------------------------------------------


def default_concurrency(settings: Any) -> int:
    """Trials in flight: what the cluster's CPUs/GPUs hold at the trial's resources (at least 1)."""
    import ray

    total = ray.cluster_resources()
    per_cpu = settings.cpus * (settings.workers if settings.use_ray_train else 1)
    n = int(total.get("CPU", 1) // max(per_cpu, 1e-9))
    if settings.gpus:
        per_gpu = settings.gpus * (settings.workers if settings.use_ray_train else 1)
        n = min(n, int(total.get("GPU", 0) // per_gpu))
    return max(1, n)
