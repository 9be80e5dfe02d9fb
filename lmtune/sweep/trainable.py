"""One Tune trial: lmtune's Trainer on one config, in the trial process or on a Ray Train worker group.

How a trial runs (``TrialSettings.workers``):

* ``workers == 1`` (the default): the Tune function trainable *is* the training process. The trainer's
  ``report`` is bound to ``ray.tune.report`` and its eval-interval checkpoints become Tune checkpoints;
  a retried or resumed trial gets ``ray.tune.get_checkpoint()`` as ``resume_from``. This skips Ray
  Train's controller, worker actor and process-group start (~5–6 s per trial on 2 CPUs, issue 3 point 8)
  where there is nothing to distribute.
* ``workers > 1``: the trial is the driver of a Ray Train ``TorchTrainer`` (``ScalingConfig`` from the
  sweep's workers/gpus/cpus, gloo on CPU, NCCL on GPU) running the Trainer on every worker under DDP.
  Rank 0's reports reach Tune through ``TuneReportCallback``; checkpoints are Train checkpoints; the
  Train run is named ``train-{trial_id}`` under the results' ``train/`` directory, so a retried trial
  (or a resumed sweep) restarts the same Train run, which resumes from its latest checkpoint.
  ``TrialSettings.ray_train=True`` forces this path for one worker too (the overhead benchmark).

OOM is a result: the trainer reports ``status=oom`` itself; an OOM that kills a Train worker (Ray's
memory monitor) is caught here and reported as ``status=oom``, and a trial process killed by the memory
monitor is restarted by Tune only to report ``status=oom`` at once (``OOM_KILLED_KEY``, set by the
scheduler in ``lmtune.sweep.search``). Anything else propagates and is retried by Tune up to the sweep's
``max_failures``.

The last report of a trial is held back until ``Trainer.fit`` returns, so that it can carry
``time_in_trainer_s`` (from building the Trainer to the end of ``fit``: what the overhead benchmark
subtracts from the sweep's wall-clock).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmtune.contract import CHECKPOINT_REPORT, REPLAYED, REUSED_FROM, TIME_IN_TRAINER
from lmtune.sweep import compat
from lmtune.sweep.resume import finished_before

OOM_KILLED_KEY = "__lmtune_oom_killed__"
"""Set in a trial's config by the driver when Ray's memory monitor killed it: the restart reports oom."""


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of one sweep shares (captured by the trainable, not part of the searched config)."""

    results_dir: str
    """The sweep's results directory (local path); W&B runs go to its wandb/."""
    group: str
    """The W&B group (the results directory's name)."""
    train_storage: str
    """Where Ray Train runs keep their state and checkpoints (``{storage}/{group}/train``)."""
    workers: int = 1
    cpus: float = 1
    gpus: float = 0
    wandb: bool = True
    ray_train: bool = False
    """Run single-worker trials through TorchTrainer too (for measuring the overhead it adds)."""
    reusable: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The storage's finished trials by fingerprint (:mod:`lmtune.sweep.reuse`; empty with --rerun)."""

    @property
    def use_ray_train(self) -> bool:
        return self.workers > 1 or self.ray_train

    def wandb_kwargs(self, trial_id: str) -> dict | None:
        """One W&B run per trial: a retried or resumed trial continues the run it started (same id, online)."""
        if not self.wandb:
            return None
        return {"project": "lmtune", "group": self.group, "name": trial_id, "dir": self.results_dir,
                "id": wandb_run_id(self.group, trial_id), "resume": "allow"}


def wandb_run_id(group: str, trial_id: str) -> str:
    """The trial's W&B run id: its Tune id and a hash of the sweep run's name (unique across sweeps, within
    W&B's 64-character id limit)."""
    import hashlib

    return f"{trial_id}-{hashlib.sha1(group.encode()).hexdigest()[:10]}"


def trial_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flat lmtune config keys of a Tune trial config."""
    return {k: v for k, v in config.items() if "." in k}


class _HoldLast:
    """Wraps a report function: passes every report through at once except the final one (status other
    than ``running``), which :meth:`flush` sends after ``fit`` with the time spent in the trainer."""

    def __init__(self, send: Callable[[dict, str | None], None]):
        self.send = send
        self.final: tuple[dict, str | None] | None = None
        self.t0 = time.perf_counter()
        self.placed = False

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if metrics.get("status", "running") != "running":
            self.final = (dict(metrics), checkpoint_dir)
            return

        metrics = dict(metrics)
        if not self.placed and not metrics.get(CHECKPOINT_REPORT):
            # where this attempt runs, in its first new report (a retry may run elsewhere; the reports a resumed
            # trainer sends again first are the earlier attempt's, unchanged)
            metrics.update(placement())
            self.placed = True
        self.send(metrics, checkpoint_dir)

    def flush(self, fallback: dict[str, Any] | None = None) -> None:
        metrics, ckpt = self.final if self.final else (dict(fallback or {}), None)
        metrics[TIME_IN_TRAINER] = time.perf_counter() - self.t0
        metrics.update(placement())
        self.send(metrics, ckpt)


def placement() -> dict[str, str]:
    """Where this trial process runs: Ray node id and IP, the GPUs Ray assigned it and what CUDA sees
    (``trials.csv`` records them per trial)."""
    import os

    import ray

    try:
        gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids())
    except Exception:
        gpu_ids = ""
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "gpu_ids": gpu_ids, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def no_cuda_message(flat: dict[str, Any], gpus: float) -> str | None:
    """Why a trial that asked Ray for GPUs cannot use them ('' when it can, or trains on the CPU on purpose)."""
    if not gpus or flat.get("system.device") == "cpu":
        return None
    import os

    import torch

    from lmtune.device import cuda_available

    if cuda_available():
        return None
    return (f"the trial asked for {gpus:g} GPU per worker and Ray assigned CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}, but torch {torch.__version__} sees no CUDA device "
            f"(a CPU-only torch build, or a node without a GPU driver); it does not train on the CPU instead. "
            f"Install the CUDA build of torch on the GPU nodes, or run with --gpus 0 and system.device=cpu.")


def _run_trainer(flat: dict[str, Any], send, *, out_dir: str | None, resume_from: str | None,
                 wandb: dict | None, device: Any = None, gpus: float = 0,
                 reusable: dict[str, dict[str, Any]] | None = None) -> None:
    """Build and fit the Trainer; the final report (held back) goes out after fit returns. A trial whose fingerprint
    is among ``reusable`` reports that trial's result instead of training."""
    from lmtune.config import from_flat
    from lmtune.device import accelerator
    from lmtune.training import Trainer
    from lmtune.training.fingerprint import fingerprint
    from lmtune.training.memory import is_oom

    hold = _HoldLast(send)
    refused = no_cuda_message(flat, gpus)
    if refused:  # a result, not a retry: another attempt on the same node would fail the same way
        hold.final = ({"status": "error", "error": refused}, None)
        hold.flush()
        return
    cfg = from_flat(flat)
    prints = fingerprint(cfg, str(accelerator(cfg.system.device, device).info()["device_name"]))
    earlier = (reusable or {}).get(prints["fingerprint"])
    if earlier is not None and resume_from is None:
        hold.final = ({**earlier["result"], **prints, "status": earlier["status"],
                       REUSED_FROM: f"{earlier['run']}/{earlier['trial_id']}"}, None)
        hold.flush()
        return
    trainer = Trainer(cfg, out_dir=out_dir, report=hold, resume_from=resume_from, wandb=wandb,
                      device=device, stage_checkpoints=True)
    try:
        trainer.fit()
    except Exception as exc:
        if not is_oom(exc) or hold.final is not None:
            trainer.cleanup()
            raise
        hold.final = ({"status": "oom", "oom_reason": str(exc).splitlines()[0][:200]}, None)
    if hold.final is not None:  # an OOM that escaped fit has no fingerprint of its own
        hold.final[0].update({k: v for k, v in prints.items() if k not in hold.final[0]})
    try:
        hold.flush()  # the final checkpoint (staged) is copied to storage here
    finally:
        trainer.cleanup()


# --- workers == 1: the trainer in the trial process ------------------------------------------------


def _tune_send(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
    from ray import tune

    if checkpoint_dir:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
    else:
        tune.report(metrics)


def _release_memory() -> None:
    """Give back what a previous trial in this (reused) process left: Python garbage, freed heap pages
    (glibc keeps them mapped otherwise) and, where there is one, the CUDA caching allocator's blocks."""
    from lmtune.device import accelerator

    accelerator("auto").release_memory()


def _run_in_trial(flat: dict[str, Any], settings: TrialSettings) -> None:
    from ray import tune

    _release_memory()
    ctx = tune.get_context()
    checkpoint = tune.get_checkpoint()
    out_dir = str(Path(ctx.get_trial_dir()) / "trainer")
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as resume_from:
        _run_trainer(flat, _tune_send, out_dir=out_dir, resume_from=resume_from,
                     wandb=settings.wandb_kwargs(ctx.get_trial_id()), gpus=settings.gpus, reusable=settings.reusable)


# --- workers > 1: a Ray Train run driven by the trial ----------------------------------------------


def _train_worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (torch.distributed is initialized: the trainer runs DDP)."""
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()

    def send(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir and rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)

    # The GPU Ray Train assigned this worker: workers of one node share CUDA_VISIBLE_DEVICES, so the local
    # rank is not necessarily the right index.
    device = None
    if loop_config.get("use_gpu") and no_cuda_message(loop_config["config"], loop_config.get("gpus", 0)) is None:
        import ray.train.torch

        device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as resume_from:
        _run_trainer(loop_config["config"], send, out_dir=loop_config["out_dir"] if rank == 0 else None,
                     resume_from=resume_from, wandb=loop_config["wandb"] if rank == 0 else None, device=device,
                     gpus=loop_config.get("gpus", 0), reusable=loop_config.get("reusable"))


def _run_with_ray_train(flat: dict[str, Any], settings: TrialSettings) -> None:
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    from lmtune.sweep.oom import first_line, is_oom_error

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    gpu = settings.gpus > 0
    resources = {"CPU": settings.cpus, **({"GPU": settings.gpus} if gpu else {})}
    trainer = TorchTrainer(
        _train_worker_loop,
        train_loop_config={
            "config": flat,
            "out_dir": str(Path(ctx.get_trial_dir()) / "trainer"),
            "wandb": settings.wandb_kwargs(trial_id),
            "use_gpu": gpu,
            "gpus": settings.gpus,
            "reusable": settings.reusable,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=settings.workers, use_gpu=gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=settings.train_storage,
            callbacks=[TuneReportCallback()],
            # Worker failures end the Train run; Tune retries the trial (FailureConfig at the Tune level,
            # genuine errors only) and the retried trial restarts this same run from its checkpoint.
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        trainer.fit()
    except TrainingFailedError as exc:
        if not is_oom_error(exc):
            raise
        tune.report({"status": "oom", "oom_reason": first_line(exc)})
    finally:
        _wait_for_forwarded_reports()


def _wait_for_forwarded_reports(timeout_s: float = 30.0) -> None:
    """Ray Train's TuneReportCallback hands each rank-0 report to this trial through a one-item queue that Tune's
    function runner drains while this function runs; the last report (the trial's final one, with its status)
    can still sit in it when ``fit()`` returns, and returning then loses it (seen: a 2-worker trial recorded as
    ``error`` at its step-55 report, its step-60 ``ok`` report never read). Wait until it has been read."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and compat.forwarded_reports_pending():
        time.sleep(0.02)


# --- the Tune function trainable --------------------------------------------------------------------


def make_trainable(settings: TrialSettings) -> Callable[[dict], None]:
    """The Tune function trainable for one sweep (a closure over ``settings``)."""

    def lmtune_trial(config: dict[str, Any]) -> None:
        from ray import tune

        if config.get(OOM_KILLED_KEY):
            # The previous attempt was killed by Ray's memory monitor: that is the trial's result.
            tune.report({"status": "oom", "oom_reason": str(config[OOM_KILLED_KEY])[:200], TIME_IN_TRAINER: 0.0})
            return
        finished = finished_before(settings.results_dir, tune.get_context().get_trial_id())
        if finished is not None:
            # A resumed sweep restarts the trials its last Tune snapshot saw running; the driver had
            # already recorded this one as finished (trials/{id}/summary.json), so that is its result.
            tune.report({**finished, REPLAYED: True, TIME_IN_TRAINER: 0.0})
            return
        flat = trial_config(config)
        if settings.use_ray_train:
            _run_with_ray_train(flat, settings)
        else:
            _run_in_trial(flat, settings)

    lmtune_trial.__mixins__ = (NamedTrial,)  # Tune's hook for the base classes of a function trainable
    return lmtune_trial


class NamedTrial:
    """The Ray dashboard shows an actor by its ``repr``, which Tune's function trainables (``ImplicitFunc``) take
    from a name shared by every trial; this one is ``lmtune trial {trial_id}``, so a person can tell them apart."""

    def setup(self, config, *args, **kwargs):
        compat.name_trial_actor(self, f"lmtune trial {self.trial_id}")
        return super().setup(config, *args, **kwargs)

    def reset(self, new_config, *args, **kwargs):
        out = super().reset(new_config, *args, **kwargs)
        compat.name_trial_actor(self, f"lmtune trial {self.trial_id}")
        return out


def trial_resources(settings: TrialSettings) -> dict[str, float]:
    """Resources Tune reserves for the trial process itself.

    In-process trials hold the training resources. A Ray Train driver holds no CPU (Train reserves its
    workers' resources in its own placement group; a fraction of a CPU here would leave a 2-worker run
    on a 2-CPU machine waiting forever), only a token of memory, since Tune needs a non-empty request;
    concurrency is bounded by ``max_concurrent_trials`` instead (see the runner).
    """
    if settings.use_ray_train:
        return {"CPU": 0, "memory": 1 << 20}
    return {"CPU": settings.cpus, **({"GPU": settings.gpus} if settings.gpus else {})}
