"""Ray's and Optuna's private parts that lmtune relies on, all of them here.

Each function below reaches something the installed Ray or Optuna has but offers no public API for; its
docstring says what lmtune needs it for and what public API is missing. Most serve ``--resume`` (the
snapshot's timing, and making Tune's, the searcher's and Optuna's records agree) and the console (Ray's
messages, the dashboard's names). They were read in the versions :data:`TESTED` names, and a changed private
attribute does not fail loudly: ``--resume`` would go wrong without a word. So :func:`check_versions` refuses
any other version before a sweep uses the cluster (exit 2), unless ``LMTUNE_UNTESTED_VERSIONS=1`` says to go on.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

from lmtune.config import ConfigError

TESTED = {"ray": ((2, 60), (2, 61)), "optuna": ((5, 0), (6, 0))}
"""Package → [lowest, highest) (major, minor) that lmtune's private accesses were read in (pyproject.toml pins them)."""
UNTESTED_ENV = "LMTUNE_UNTESTED_VERSIONS"


def _version(package: str) -> tuple[int, int] | None:
    try:
        m = re.match(r"(\d+)\.(\d+)", metadata.version(package))
    except metadata.PackageNotFoundError:
        return None
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_versions(versions: dict[str, tuple[int, int] | None] | None = None) -> None:
    """ConfigError naming the package, its version and the tested range when Ray or Optuna is outside it."""
    if os.environ.get(UNTESTED_ENV) == "1":
        return
    versions = versions if versions is not None else {p: _version(p) for p in TESTED}
    for package, (low, high) in TESTED.items():
        have = versions.get(package)
        if have is not None and not low <= have < high:
            raise ConfigError(
                f"{package} {have[0]}.{have[1]} is not a version lmtune was tested with ({package} >= {low[0]}.{low[1]}, "
                f"< {high[0]}.{high[1]}): --resume relies on its internals (lmtune/sweep/compat.py). Install the tested "
                f"range (pip install -e .), or set {UNTESTED_ENV}=1 to run anyway.")


# --- Ray core -----------------------------------------------------------------------------------------


def session_dir() -> Path:
    """This driver's Ray session directory (its ``logs/`` are linked into the results). No public API names it."""
    from ray._private import worker

    return Path(worker._global_node.get_session_dir_path())


def redirect_cluster_messages(handler: Callable[[dict, bool], None]) -> None:
    """Every driver runs a thread that prints the GCS's error messages (a node marked dead, a worker killed, …) to
    stdout as ``(raylet) …`` lines through ``ray._private.worker.print_to_stdstream``, looked up at each call;
    ``log_to_driver=False`` does not silence it and no option routes it elsewhere."""
    from ray._private import worker

    worker.print_to_stdstream = handler


def running_clusters() -> list[str]:
    """The GCS addresses of the Ray clusters running on this machine (live processes). No public API lists them."""
    from ray._private import services

    return sorted(set(services.find_gcs_addresses()))


BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
"""What ``ray up`` leaves on the head node: the cluster launcher's config with its node types."""


def autoscaler_node_types() -> list[tuple[str, dict[str, float] | None, int]] | None:
    """The node types the joined cluster's autoscaler may start: (name, resources of one node or None when the
    config leaves them to be detected, most nodes of the type, -1 for no limit); None when no autoscaler is known.

    No public API says what nodes a cluster could add. Ray's autoscaler v2 (and KubeRay) records them in the GCS,
    read here as Ray Data reads them (``ray._private.state.state.get_cluster_config``); ``ray up``'s autoscaler
    leaves its config on the head as ``~/ray_bootstrap_config.yaml``, whose presence Tune itself takes for an
    autoscaling cluster."""
    from ray._private import state

    try:
        config = state.state.get_cluster_config()
    except Exception:
        config = None
    if config is not None and config.node_group_configs:
        return [(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
                for g in config.node_group_configs]
    path = BOOTSTRAP_CONFIG.expanduser()
    if not path.is_file():
        return None
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    types = doc.get("available_node_types") or {}
    head = doc.get("head_node_type")
    out = []
    for name, spec in types.items():
        spec = spec or {}
        res = spec.get("resources")
        count = 1 if name == head else int(spec.get("max_workers", doc.get("max_workers", 0)) or 0)
        out.append((str(name), {k: float(v) for k, v in res.items()} if isinstance(res, dict) else None, count))
    return out


# --- Ray Tune ---------------------------------------------------------------------------------------


def checkpoint_step(trial: Any) -> int | None:
    """The ``step`` of the report that carried a Tune trial's latest checkpoint (where a retried or resumed trial
    starts again), None without one. ``Trial.latest_checkpoint_result`` is a public property, but what it returns
    (``ray.train._internal.session._TrainingResult`` and its ``metrics``) is not."""
    result = getattr(trial, "latest_checkpoint_result", None)
    step = (getattr(result, "metrics", None) or {}).get("step") if result is not None else None
    return step if isinstance(step, int) else None


def controller(tune_controller: Any) -> Any:
    """The TuneController itself: schedulers are handed a wrapper (``_tune_controller`` inside) that warns about
    attributes outside a whitelist, which would hide the controller's own."""
    return getattr(tune_controller, "_tune_controller", tune_controller)


def search_alg(controller: Any) -> Any:
    """TuneController._search_alg: its search algorithm (SearchGenerator → ConcurrencyLimiter → searcher)."""
    return getattr(controller, "_search_alg", None)


def started_trials(controller: Any) -> list:
    """Trials whose process exists: running, or pending with an actor being started (Tune marks a trial RUNNING
    only once its actor is up). TuneController._trial_to_actor: trial → its actor."""
    return [t for t in getattr(controller, "_trial_to_actor", {}) if not t.is_finished()]


def snapshot_experiment(controller: Any) -> None:
    """Save the experiment now (trials, checkpoints, searcher), waiting for the write. Tune saves on its own
    period only; TuneController.checkpoint is its internal entry point."""
    controller.checkpoint(force=True, wait=True)


RESTORE_LOGGER = "ray.tune.execution.tune_controller"
RESTORE_FAILED = "Failed to restore the run state."
"""What TuneController.__init__ logs (with the exception) when it cannot restore an experiment, before it starts
the experiment over from nothing."""


def watch_restore(failed: Callable[[str], None]) -> Callable[[], None]:
    """Call ``failed(reason)`` if Tune logs that it could not restore the experiment; returns the function that stops
    watching. TuneController.__init__ catches the exception and goes on with a new experiment: no exception leaves
    ``Tuner.fit``. Its public ``resumed`` property says the same, but the controller is only reachable from the
    scheduler's hooks during a step, and a restore that failed can end Tune without one (nothing left to run), so
    its log record is the one signal that always comes."""
    import logging

    class Watch(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage() == RESTORE_FAILED:
                exc = record.exc_info[1] if record.exc_info else None
                failed(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}" if exc
                       else "see logs/driver.log")
            return True

    watch = Watch()
    logging.getLogger(RESTORE_LOGGER).addFilter(watch)
    return lambda: logging.getLogger(RESTORE_LOGGER).removeFilter(watch)


def snapshot_templates() -> list[tuple[str, str]]:
    """(file-name template with ``{}`` for the session, format) of each file a Tune snapshot writes per driver
    session: the trials (JSON), the search algorithm's wrappers, the searcher, the callbacks (pickles). Tune's
    CKPT_FILE_TMPL class attributes; no API lists a snapshot's files."""
    from ray.tune.callback import CallbackList
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search import Searcher, SearchGenerator

    return [(TuneController.CKPT_FILE_TMPL, "json")] + [
        (c.CKPT_FILE_TMPL, "pickle") for c in (SearchGenerator, Searcher, CallbackList)]


def set_trials_made(generator: Any, n: int) -> None:
    """SearchGenerator._counter: the trials it has made; at ``num_samples`` Tune ends the sweep. Saved with the
    searcher's state, which a driver killed during Tune's snapshot copy can leave out of step with the
    experiment it restores. No public setter."""
    generator._counter = n


def reset_live_trials(limiter: Any, trial_ids: Iterable[str]) -> None:
    """A ConcurrencyLimiter's live set (saved with the searcher; it may name trials the restored experiment does
    not have): ``live_trials`` and ``num_unfinished_live_trials`` are its bookkeeping, not an interface."""
    limiter.live_trials = set(trial_ids)
    limiter.num_unfinished_live_trials = len(limiter.live_trials)


def tuner_callbacks(tuner: Any) -> list:
    """The callbacks of a Tuner (restored from its tuner.pkl). Tuner._local_tuner: the object behind the Tuner."""
    return list(tuner._local_tuner.get_run_config().callbacks or [])


def tuner_search_alg(tuner: Any) -> Any:
    """The search algorithm a Tuner will run (restored from its tuner.pkl), wrappers and all."""
    return tuner._local_tuner._tune_config.search_alg


def tuner_scheduler(tuner: Any) -> Any:
    """The scheduler a Tuner will run (restored from its tuner.pkl)."""
    return tuner._local_tuner._tune_config.scheduler


def asha_state(asha: Any) -> dict:
    """ASHA's rungs (every trial's recorded value per rung), its trial → bracket map and counters. Tune saves no
    scheduler state with its experiment (ray#30838) and AsyncHyperBandScheduler has no get/set state."""
    import copy

    brackets = list(asha._brackets)
    return {"brackets": copy.deepcopy(brackets), "counter": asha._counter, "num_stopped": asha._num_stopped,
            "trial_info": {tid: brackets.index(b) for tid, b in asha._trial_info.items() if b in brackets}}


def set_asha_state(asha: Any, state: dict) -> None:
    """The inverse of :func:`asha_state`."""
    asha._brackets = state["brackets"]
    asha._trial_info = {tid: asha._brackets[i] for tid, i in state["trial_info"].items()}
    asha._counter, asha._num_stopped = state["counter"], state["num_stopped"]


def asha_knows(asha: Any, trial_id: str) -> bool:
    """Whether ASHA has a bracket for the trial (restored with its rungs)."""
    return trial_id in asha._trial_info


def asha_rungs_of(asha: Any, trial_id: str) -> set:
    """The rung milestones at which ASHA has recorded the trial's metric."""
    bracket = asha._trial_info.get(trial_id)
    return {m for m, recorded in bracket._rungs if trial_id in recorded} if bracket is not None else set()


def asha_record(asha: Any, trial_id: str, t: Any, value: float) -> None:
    """Record a report of the trial (``t`` in ASHA's time attribute, ``value`` its metric) at its rung, as ASHA's own
    handling of a result does; the decision is not used."""
    from types import SimpleNamespace

    bracket = asha._trial_info.get(trial_id)
    if bracket is not None:
        bracket.on_result(SimpleNamespace(trial_id=trial_id), t, asha._metric_op * value)


def name_trial_actor(trainable: Any, name: str) -> None:
    """The Ray dashboard shows an actor by its ``repr``; Tune's function trainables (ImplicitFunc) return
    ``self._name``, one name shared by every trial, and take no other."""
    trainable._name = name


def forwarded_reports_pending() -> bool:
    """Whether Ray Train's TuneReportCallback has handed this trial a report that Tune's function runner has not
    read yet: the Tune session's ``_inter_actor_queue`` (``ray.train._internal.session``), the one-item queue
    between them; no public API says whether it is empty."""
    from ray.train._internal.session import get_session

    queue = getattr(get_session(), "_inter_actor_queue", None)
    return queue is not None and not queue.empty()


# --- Optuna, and Tune's OptunaSearch --------------------------------------------------------------------


def study(search: Any) -> Any:
    """OptunaSearch._ot_study: the optuna.Study it asks and tells."""
    return search._ot_study


def study_trials(search: Any) -> dict:
    """OptunaSearch._ot_trials: Tune trial id → the optuna.Trial it was asked as."""
    return search._ot_trials


def told(search: Any) -> set:
    """OptunaSearch._completed_trials: the Tune trial ids it has told the study about."""
    return search._completed_trials


def search_space(search: Any) -> Any:
    """OptunaSearch._space: its distributions (a dict), or the define-by-run function."""
    return search._space


def stored_trials(study: Any, states: Iterable[Any] | None = None) -> list:
    """Every trial in the study's storage (FrozenTrials), without copying. Study.get_trials copies, and filters
    through the pruner's view of the study; Study._storage/_study_id are its storage and id there."""
    return study._storage.get_all_trials(study._study_id, deepcopy=False,
                                         states=tuple(states) if states is not None else None)


def storage_id(trial: Any) -> int:
    """(Frozen)Trial._trial_id: the trial's id in the storage (``number`` counts within a study only)."""
    return trial._trial_id


def stored(study: Any, trial: Any) -> Any:
    """The trial as stored now (its state may have changed since it was asked)."""
    return study._storage.get_trial(storage_id(trial))


def live_trial(study: Any, frozen: Any) -> Any:
    """A live optuna.Trial for a stored one, which ``study.ask`` gives only for new trials."""
    from optuna.trial import Trial

    return Trial(study, storage_id(frozen))


def close_interrupted(study: Any, frozen: Any) -> None:
    """End a stored RUNNING trial as FAIL with ``status=interrupted``; Study.tell takes only live trials."""
    from optuna.trial import TrialState

    study._storage.set_trial_user_attr(storage_id(frozen), "status", "interrupted")
    study._storage.set_trial_state_values(storage_id(frozen), TrialState.FAIL)


def grid_point(sampler: Any, grid_id: int) -> dict:
    """The params of a GridSampler's grid point (its ``_all_grids``, over its sorted ``_param_names``)."""
    return dict(zip(sampler._param_names, sampler._all_grids[grid_id]))


def grid_in_given_order(sampler: Any) -> None:
    """Make a GridSampler walk its grid in product order of the axes as given (GridSampler shuffles it; trial i
    below the grid size runs ``_all_grids[i]``), over its ``_search_space`` (axes sorted by name)."""
    import itertools

    sampler._all_grids = list(itertools.product(*sampler._search_space.values()))
