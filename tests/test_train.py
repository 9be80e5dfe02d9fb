"""The trainer: real tiny runs on the built-in corpus."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmtune import config as config_lib
from lmtune.model import GPT
from lmtune.train import Trainer
from tests.conftest import TINY, run_module
from tests.helpers import one_error_line


def tiny(*extra: str) -> config_lib.Config:
    return config_lib.load(overrides=[*TINY, *extra], locked=False)


def losses(history):
    return [m["loss"] for m in history if "loss" in m and m["status"] == "running"]


def test_import_train_does_not_load_ray():
    code = "import sys, lmtune.train, lmtune.generate; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_summary_has_design_metric_names(tmp_path):
    summary = Trainer(tiny(), out_dir=tmp_path).fit()
    assert summary["status"] == "ok"
    for name in ("step", "tokens", "epoch", "loss", "val_loss", "val_ppl", "lr", "grad_norm", "grad_norm/layer_0",
                 "grad_norm/layer_1", "grad_norm_spread", "grad_coherence", "noise_scale", "step_time_ms",
                 "avg_step_time_ms", "wall_clock_s", "tokens_per_s", "peak_reserved_gib", "peak_allocated_gib"):
        assert name in summary, name
    assert summary["step"] == 20 and summary["tokens"] == 20 * 4 * 32
    assert math.isclose(summary["val_ppl"], math.exp(summary["val_loss"]), rel_tol=1e-9)
    assert -1.0 <= summary["grad_coherence"] < 1.0  # distinct sequences: not all alike
    # Tensor bytes, not the process: at least parameters + AdamW's two moments, far below the RSS.
    params = 4 * sum(p.numel() for p in GPT(config_lib.load(overrides=TINY, locked=False).model, 256).parameters())
    assert 3 * params / 2**30 < summary["peak_allocated_gib"] < 0.2 * summary["peak_rss_gib"]
    assert summary["peak_reserved_gib"] == summary["peak_allocated_gib"]  # no caching allocator on CPU
    assert summary["memory_model"].startswith("cpu: peak live tensor bytes")
    assert summary["ac_mode"] == "blocks" and summary["device_memory_gib"] > summary["peak_rss_gib"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["status"] == "ok" and all(m["status"] == "running" for m in lines[:-1])
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["config"]["model.n_layer"] == 2 and saved["status"] == "ok"
    assert (tmp_path / "checkpoint" / "checkpoint.pt").is_file()
    assert (tmp_path / "samples.txt").read_text().strip()


def test_same_seed_same_losses_and_other_seed_differs():
    runs = [Trainer(tiny()) for _ in range(2)] + [Trainer(tiny("train.seed=7"))]
    for t in runs:
        t.fit()
    assert losses(runs[0].history) == losses(runs[1].history)
    assert losses(runs[0].history) != losses(runs[2].history)


def test_resume_reproduces_uninterrupted_trajectory(tmp_path):
    extra = ("train.steps=30", "model.dropout=0.1")  # dropout: the RNG state must be restored too
    full = Trainer(tiny(*extra), out_dir=tmp_path / "full")
    full.fit()
    # An interrupted run: the same config, stopped after its step-10 checkpoint.
    first = Trainer(tiny(*extra, "train.steps=10"), out_dir=tmp_path / "part")
    first.fit()
    resumed = Trainer(tiny(*extra), out_dir=tmp_path / "resumed", resume_from=tmp_path / "part" / "checkpoint")
    summary = resumed.fit()
    after = [m for m in full.history if m["step"] > 10]
    again = [m for m in resumed.history if m["step"] > 10]
    assert [m["step"] for m in after] == [m["step"] for m in again]
    for a, b in zip(after, again):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert a[key] == b[key], (a["step"], key)
    assert summary["val_loss"] == full.history[-1]["val_loss"]


def test_resumed_trainer_first_sends_the_reports_its_checkpoint_was_saved_with(tmp_path):
    """What a sweep driver needs to keep metrics.jsonl whole when the interruption came between a
    checkpoint and its reports reaching the driver."""
    from lmtune.contract import CHECKPOINT_REPORT

    class Interrupted(Exception):
        pass

    heard: list[dict] = []

    def report_until_first_checkpoint(metrics, checkpoint_dir):
        heard.append(metrics)
        if checkpoint_dir:
            raise Interrupted  # the machine went away right after the step-10 checkpoint

    cfg = tiny("train.steps=30")
    with pytest.raises(Interrupted):
        Trainer(cfg, out_dir=tmp_path / "part", report=report_until_first_checkpoint).fit()
    again: list[dict] = []
    Trainer(cfg, resume_from=tmp_path / "part" / "checkpoint", report=lambda m, c: again.append(m)).fit()
    # The reports up to the checkpoint (here all of them: it is the first) come again, marked, ...
    assert [m["step"] for m in heard] == [5, 10, 10] and "val_loss" in heard[-1]
    assert again[:3] == [{**m, CHECKPOINT_REPORT: True} for m in heard]
    assert [m["step"] for m in again[3:]] == [15, 20, 20, 25, 30]  # ...then on from the checkpoint, as uninterrupted


def test_learns_builtin_corpus_golden_loss():
    """~300 steps of a 2-layer byte model on real English: the loss falls from ln(256) to a known value."""
    cfg = tiny("train.steps=300", "train.eval_interval=300", "train.eval_batches=8", "train.log_interval=50",
               "train.measure_interval=0", "train.micro_batch_size=8", "model.n_embd=64")
    summary = Trainer(cfg).fit()
    assert summary["status"] == "ok"
    assert summary["val_loss"] < 0.55 * math.log(256)
    assert summary["val_loss"] == pytest.approx(GOLDEN_VAL_LOSS, rel=0.02)


GOLDEN_VAL_LOSS = 2.613  # measured on the project machine (torch 2.13 CPU, 1 thread): 300 steps


def test_emulated_memory_limit_is_enforced_on_tensor_bytes_not_the_process():
    """The tiny run's tensors peak near 1.4 MiB while the process holds ~300 MiB: a 0.05 GiB limit fits the
    tensors (as it would a device), a 0.001 GiB one does not."""
    fits = Trainer(tiny("system.memory_limit_gib=0.05")).fit()
    assert fits["status"] == "ok" and fits["peak_rss_gib"] > 0.05 > fits["peak_allocated_gib"]
    summary = Trainer(tiny("system.memory_limit_gib=0.001")).fit()
    assert summary["status"] == "oom"
    assert summary["peak_allocated_gib"] > 0.001
    assert "crossed system.memory_limit_gib=0.001" in summary["oom_reason"]
    assert summary["step"] == 3  # the first step after the 2 warmup steps is probed, and ends there


def test_injected_cuda_style_oom_is_a_result(monkeypatch):
    """A real torch.OutOfMemoryError raised inside the step (as CUDA raises it) ends the run as oom."""
    trainer = Trainer(tiny())
    real = Trainer._forward_backward

    def failing(self, k, measuring):
        if self.step == 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, k, measuring)

    monkeypatch.setattr(Trainer, "_forward_backward", failing)
    summary = trainer.fit()
    assert summary["status"] == "oom" and summary["step"] == 7
    assert trainer.history[-1]["status"] == "oom"


def test_divergence_ends_run_early():
    summary = Trainer(tiny("train.lr=50.0", "train.grad_clip=0", "train.steps=200", "train.optimizer=sgd")).fit()
    assert summary["status"] == "diverged"
    assert summary["step"] < 200


@pytest.mark.parametrize("trigger", ["non-finite", "explosion"])
def test_each_divergence_trigger_alone_ends_the_run(monkeypatch, trigger):
    """A non-finite loss, and a finite loss above divergence_factor × the first one, each end it as diverged."""
    real = Trainer._train_metrics

    def losses_go_wrong(self, loss, grad_norm, lr):
        metrics = real(self, loss, grad_norm, lr)
        if self.step >= 10:
            metrics["loss"] = float("nan") if trigger == "non-finite" else 2.9 * self.first_loss * (self.step / 10)
        return metrics

    monkeypatch.setattr(Trainer, "_train_metrics", losses_go_wrong)
    summary = Trainer(tiny("train.steps=30", "train.divergence_factor=3.0")).fit()
    assert summary["status"] == "diverged"
    # non-finite: at the first report from step 10; explosion: 2.9× is not yet 3×, 2.9·1.5 at step 15 is.
    assert summary["step"] == (10 if trigger == "non-finite" else 15)


def test_lr_scaling_and_schedule():
    from lmtune.training.optim import effective_lr, lr_at

    cfg = tiny("train.lr=1e-3", "train.base_batch_tokens=128", "train.lr_scaling=linear")
    assert effective_lr(cfg, 512) == pytest.approx(4e-3)
    cfg = tiny("train.lr=1e-3", "train.base_batch_tokens=128", "train.lr_scaling=sqrt")
    assert effective_lr(cfg, 512) == pytest.approx(2e-3)
    cfg = tiny("train.warmup_steps=10", "train.schedule=cosine", "train.min_lr_ratio=0.1")
    assert lr_at(0, 1.0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, cfg) == pytest.approx(1.0)
    assert lr_at(99, 1.0, 100, cfg) == pytest.approx(0.1)  # the last step is at the floor, not above it
    assert lr_at(100, 1.0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(54, 1.0, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))


def check_cosine_schedule(schedule, monkeypatch) -> None:
    """Known answers of the cosine at a peak lr that is not 1 (at 1 a floor of min_lr_ratio and one of
    min_lr_ratio·peak are the same number), by hand; then a real run with the trainer on ``schedule`` ends at
    min_lr_ratio·peak, in its last report and in its optimizer."""
    import lmtune.training.trainer as trainer_module

    cfg = tiny("train.warmup_steps=10", "train.schedule=cosine", "train.min_lr_ratio=0.1")
    peak = 3e-3
    assert schedule(0, peak, 100, cfg) == pytest.approx(3e-4)  # warmup: 1/10 of the peak
    assert schedule(9, peak, 100, cfg) == pytest.approx(3e-3)
    assert schedule(54, peak, 100, cfg) == pytest.approx(3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    assert schedule(99, peak, 100, cfg) == pytest.approx(3e-4)  # the floor: 0.1·peak, at the last step
    monkeypatch.setattr(trainer_module, "lr_at", schedule)
    run = Trainer(tiny("train.steps=4", "train.warmup_steps=1", "train.schedule=cosine", "train.min_lr_ratio=0.2",
                       "train.lr=3e-3", "train.lr_scaling=none", "train.eval_interval=4", "train.log_interval=1"))
    assert run.fit()["lr"] == pytest.approx(0.2 * 3e-3)
    groups = run.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([0.2 * 3e-3] * len(groups))


def test_cosine_schedule_ends_at_its_floor_relative_to_the_peak(monkeypatch):
    from lmtune.training.optim import lr_at

    check_cosine_schedule(lr_at, monkeypatch)


def _floor_not_scaled(step, peak, total, cfg):
    """Broken on purpose: the cosine decays to min_lr_ratio itself, not to min_lr_ratio·peak (the same at peak 1)."""
    from lmtune.training.optim import lr_at

    r, at_one = cfg.train.min_lr_ratio, lr_at(step, 1.0, total, cfg)  # at peak 1 the cosine is r + (1 - r)·c
    return peak * at_one if step < cfg.train.warmup_steps else r + (peak - r) * (at_one - r) / (1 - r)


def _floor_one_step_late(step, peak, total, cfg):
    """Broken on purpose: the cosine reaches its floor one step after the run's last step."""
    from lmtune.training.optim import lr_at

    return lr_at(step, peak, total + 1, cfg)


@pytest.mark.parametrize("broken", [_floor_not_scaled, _floor_one_step_late], ids=lambda f: f.__name__.strip("_"))
def test_schedule_check_catches_a_wrong_floor(broken, monkeypatch):
    with pytest.raises(AssertionError):
        check_cosine_schedule(broken, monkeypatch)


def check_epochs_to_steps(plan_of) -> None:
    """train.epochs counts passes over the training split: windows of seq_len tokens, micro_batch_size ·
    accumulation_steps · workers of them per optimizer step, rounded up; by hand, on 1, 2 and 4 data-parallel
    workers (tests/test_ddp.py runs it on two)."""
    cfg = tiny("train.epochs=1.5", "train.micro_batch_size=4", "train.accumulation_steps=2")  # seq_len 32
    tokens = 32 * 1000 + 1  # 1000 windows (the last one's targets need a token past it)
    assert [plan_of(cfg, tokens, world).total_steps for world in (1, 2, 4)] == [188, 94, 47]  # ⌈1500 / (8·world)⌉
    assert plan_of(tiny("train.steps=7"), tokens, 2).total_steps == 7  # without epochs: the steps as given


def test_epochs_turn_into_steps_over_every_worker():
    from lmtune.training.optim import Plan

    check_epochs_to_steps(Plan.of)


def _epochs_per_worker(cfg, train_tokens, world_size):
    """Broken on purpose: the steps of an epoch counted as if one worker took every window."""
    import dataclasses

    from lmtune.training.optim import Plan

    alone = Plan.of(cfg, train_tokens, 1)
    return dataclasses.replace(Plan.of(cfg, train_tokens, world_size), total_steps=alone.total_steps)


def _epochs_rounded_down(cfg, train_tokens, world_size):
    """Broken on purpose: the last, partial step of an epoch dropped."""
    import dataclasses

    from lmtune.training.optim import Plan

    plan = Plan.of(cfg, train_tokens, world_size)
    t = cfg.train
    windows = (train_tokens - 1) // cfg.data.seq_len
    steps = int(t.epochs * windows / (t.micro_batch_size * t.accumulation_steps * world_size))
    return dataclasses.replace(plan, total_steps=steps) if t.epochs else plan


@pytest.mark.parametrize("broken", [_epochs_per_worker, _epochs_rounded_down], ids=lambda f: f.__name__.strip("_"))
def test_epochs_check_catches_steps_counted_wrong(broken):
    with pytest.raises(AssertionError):
        check_epochs_to_steps(broken)


class LastMicroBatchOnly(Trainer):
    """Broken on purpose: keeps only the last micro-batch's gradient."""

    def _forward_backward(self, k, measuring):
        for _ in range(k - 1):
            self.batches.next()
        return super()._forward_backward(1, measuring)


class SumsWithoutDividing(Trainer):
    """Broken on purpose: sums the k micro-batch gradients instead of averaging them."""

    def _forward_backward(self, k, measuring):
        loss = super()._forward_backward(k, measuring)
        for p in self.raw_model.parameters():
            p.grad *= k
        return loss


def check_accumulation(trainer_cls) -> None:
    """k=2 micro-batches of 4 take the same SGD steps as one of 8 on the same windows: no clipping, no
    momentum, so any error in the gradient's scale or content shows in the parameters."""
    common = ("train.optimizer=sgd", "train.momentum=0", "train.lr=0.5", "train.grad_clip=0", "train.measure_interval=0",
              "train.steps=3", "train.log_interval=1", "train.eval_interval=3", "train.checkpoint=false")
    a = trainer_cls(tiny(*common, "train.micro_batch_size=4", "train.accumulation_steps=2"))
    b = Trainer(tiny(*common, "train.micro_batch_size=8", "train.accumulation_steps=1"))
    a.fit(), b.fit()
    assert losses(a.history) == pytest.approx(losses(b.history), rel=1e-5)
    for (name, pa), pb in zip(a.raw_model.named_parameters(), b.raw_model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_accumulation_matches_bigger_micro_batch():
    check_accumulation(Trainer)


@pytest.mark.parametrize("broken", [LastMicroBatchOnly, SumsWithoutDividing], ids=lambda c: c.__name__)
def test_accumulation_check_catches_a_broken_accumulation(broken):
    with pytest.raises(AssertionError):
        check_accumulation(broken)


# --- W&B ------------------------------------------------------------------------------------------


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    """No WANDB_MODE, no key, and a home without a .netrc: the trainer's own decision is what runs."""
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_wandb_mode_online_only_with_a_key_in_the_environment_or_netrc(no_wandb_env, monkeypatch):
    from lmtune.training.reporting import wandb_mode

    assert wandb_mode() == "offline"
    (no_wandb_env / ".netrc").write_text("machine github.com login x password y\n")
    assert wandb_mode() == "offline"  # a netrc without W&B's host is no key
    (no_wandb_env / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123abcd\n")
    assert wandb_mode() == "online"
    (no_wandb_env / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123abcd")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # an explicit mode wins
    assert wandb_mode() == "disabled"


def test_wandb_offline_run_holds_the_metrics_and_config(tmp_path, no_wandb_env):
    """Without a key the run is offline (decided by the trainer, not the environment); what it logged is read
    back from the run's own file: the DESIGN metric names, the flat config, the final status."""
    from tests.wandb_log import read_run

    Trainer(tiny(), wandb={"project": "lmtune-test", "group": "g-1", "name": "tiny", "dir": str(tmp_path)}).fit()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = read_run(runs[0])
    assert run.config["model.n_layer"] == 2 and run.config["train.micro_batch_size"] == 4
    logged = {k for row in run.history for k in row}
    assert {"loss", "val_loss", "grad_norm", "grad_norm/layer_0", "grad_coherence", "tokens_per_s",
            "peak_allocated_gib", "step", "tokens"} <= logged
    assert [row["step"] for row in run.history if "loss" in row] == [5, 10, 15, 20]  # W&B merges a step's reports
    assert all("val_loss" in row for row in run.history if row["step"] in (10, 20))
    assert run.summary["status"] == "ok" and run.summary["val_loss"] == pytest.approx(run.history[-1]["val_loss"])


def check_trial_continues_its_wandb_run(wandb_kwargs, tmp_path) -> None:
    """A sweep trial's W&B settings (``TrialSettings.wandb_kwargs``) name its run by the trial and ask W&B to
    continue that run where it exists; a trial resumed from its checkpoint with them (a retry, a resumed sweep) logs
    into the same run, from the step after the checkpoint. Offline, each attempt is a directory of its own: the
    run id and the resume flag in each are what `wandb sync` (and an online run at once) joins them by; without
    the flag a second attempt of the same id is refused online, or replaces the first."""
    from lmtune.sweep.trainable import TrialSettings, wandb_run_id
    from tests.wandb_log import read_run

    settings = TrialSettings(results_dir=str(tmp_path), group="1-sweep-20261201-000000-000000", train_storage="")
    kw = wandb_kwargs(settings, "1a2b3c4d")
    run_id = wandb_run_id(settings.group, "1a2b3c4d")
    assert kw == {"project": "lmtune", "group": settings.group, "name": "1a2b3c4d", "dir": str(tmp_path),
                  "id": run_id, "resume": "allow"}
    Trainer(tiny("train.steps=10"), out_dir=tmp_path / "part", wandb=kw).fit()
    again = wandb_kwargs(settings, "1a2b3c4d")  # the resumed trial's, made anew in its process
    Trainer(tiny(), out_dir=tmp_path / "part", wandb=again, resume_from=tmp_path / "part" / "checkpoint").fit()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    first, second = (read_run(r) for r in runs)
    assert first.run_id == second.run_id == run_id and first.resume and second.resume
    assert max(row["step"] for row in first.history) == 10
    assert min(row["step"] for row in second.history) == 15  # it goes on after the step-10 checkpoint


def test_resumed_trial_continues_its_wandb_run(tmp_path, no_wandb_env):
    from lmtune.sweep.trainable import TrialSettings

    check_trial_continues_its_wandb_run(TrialSettings.wandb_kwargs, tmp_path)


def _without_resume(kwargs: dict) -> dict:
    """Broken on purpose: the trial's run settings without ``resume="allow"`` (offline runs ignore it)."""
    return {k: v for k, v in kwargs.items() if k != "resume"}


def _a_run_per_attempt(kwargs: dict) -> dict:
    """Broken on purpose: a new run id per attempt (the run is named after the trial, but not continued)."""
    import uuid

    return {**kwargs, "id": uuid.uuid4().hex[:12]}


@pytest.mark.parametrize("broken", [_without_resume, _a_run_per_attempt], ids=lambda f: f.__name__.strip("_"))
def test_wandb_check_catches_a_trial_that_does_not_continue_its_run(broken, tmp_path, no_wandb_env, monkeypatch):
    from lmtune.sweep.trainable import TrialSettings

    made = TrialSettings.wandb_kwargs
    monkeypatch.setattr(TrialSettings, "wandb_kwargs", lambda settings, trial_id: broken(made(settings, trial_id)))
    with pytest.raises(AssertionError):
        check_trial_continues_its_wandb_run(TrialSettings.wandb_kwargs, tmp_path)


def test_no_wandb_writes_no_run(in_tmp, no_wandb_env):
    from lmtune.train import main

    assert main([*TINY, "--out", "run", "--no-wandb"]) == 0
    assert not list(in_tmp.rglob("offline-run-*")) and not (in_tmp / "run" / "wandb").exists()


# --- the command line ----------------------------------------------------------------------------


def test_cli_run_and_generate(in_tmp):
    proc = run_module("lmtune.train", *TINY, "--out", "run1", "--no-wandb", cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((in_tmp / "run1" / "summary.json").read_text())
    assert summary["status"] == "ok"
    gen = run_module("lmtune.generate", "--checkpoint", "run1/checkpoint", "--prompt", "The ", "--max-new-tokens",
                     "20", cwd=in_tmp)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("The ") and len(gen.stdout) > 10
    again = run_module("lmtune.train", *TINY, "--out", "run1", "--no-wandb", cwd=in_tmp)
    assert again.returncode == 2 and "already holds a run" in one_error_line(again.stderr)


@pytest.mark.parametrize(
    "args, key, accepted",
    [
        (["train.lrr=1"], "train.lrr", "Keys of [train]: optimizer, lr,"),
        (["train.lr=fast"], "train.lr=fast", "expected a number (> 0.0)"),
        (["train.lr=nan"], "train.lr=nan", "expected a finite number (> 0.0)"),
        (["train.lr=inf"], "train.lr=inf", "expected a finite number (> 0.0)"),
        (["train.grad_clip=-inf"], "train.grad_clip=-inf", "expected a finite number (>= 0.0)"),
        (["train.micro_batch_size=0"], "train.micro_batch_size=0", "expected an integer (>= 1)"),
        (["data.seq_len=64"], "data.seq_len=64", "accepted: data.seq_len <= model.block_size"),
        (["data.tokenizer=sentencepiece"], "data.tokenizer=sentencepiece", "one of 'gpt2', 'byte'"),
        (["data.dataset=no-such-dataset"], "no-such-dataset", "builtin"),
        (["data.dataset=files", "data.files=/nonexistent/*.txt"], "/nonexistent", "data.files"),
        (["train.optimizer=lion"], "train.optimizer=lion", "one of 'adamw', 'adam', 'sgd'"),
        (["nonsense"], "nonsense", "section.key=value"),
        (["missing.toml"], "missing.toml", "config file not found"),
        (["model.vocab_size=100"], "model.vocab_size=100", "at least 256"),
    ],
)
def test_bad_input_is_one_error_line_naming_the_key_and_what_is_accepted(in_tmp, capsys, args, key, accepted):
    from lmtune.train import main

    assert main([*TINY, *args, "--no-wandb", "--out", "x"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert key in line and accepted in line, line


def test_bad_input_as_a_real_command_is_one_line_on_stderr(in_tmp):
    """The same through `python -m lmtune.train` (notices go to stdout, an error alone to stderr)."""
    (in_tmp / "empty.txt").write_text("")
    proc = run_module("lmtune.train", *TINY, "data.dataset=files", "data.files=empty.txt", "--no-wandb", cwd=in_tmp)
    assert proc.returncode == 2
    assert "empty.txt" in one_error_line(proc.stderr)


def test_out_that_is_a_file_and_corrupt_checkpoint_are_one_line(in_tmp, capsys):
    from lmtune.train import main

    (in_tmp / "afile").write_text("x")
    assert main([*TINY, "--no-wandb", "--out", "afile"]) == 2
    assert "--out afile: afile is a file; expected a directory" in one_error_line(capsys.readouterr().err)
    assert main([*TINY, "--no-wandb", "--out", "afile/run"]) == 2  # no directory can be made below a file
    assert "afile is a file, so no directory can be made below it" in one_error_line(capsys.readouterr().err)
    ckpt = in_tmp / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.pt").write_bytes(b"\x80\x04 this is not a checkpoint")
    (ckpt / "config.json").write_text(json.dumps(tiny().flat()))
    assert main(["--resume", str(ckpt), "--no-wandb"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot read checkpoint {ckpt / 'checkpoint.pt'}" in line


def test_resume_from_a_checkpoint_alone_continues_the_run_in_its_directory(in_tmp, capsys):
    """--resume DIR/checkpoint train.steps=N: the saved config, the same directory, one stream of reports."""
    from lmtune.train import main

    assert main([*TINY, "train.steps=20", "--out", "run", "--no-wandb"]) == 0
    assert main(["--resume", "run/checkpoint", "train.steps=30", "--no-wandb"]) == 0
    reports = [json.loads(line) for line in (in_tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    running = [(m["step"], "val_loss" in m) for m in reports if m["status"] == "running"]
    assert running == sorted(running) and len(running) == len(set(running))  # each report once
    assert reports[-1]["status"] == "ok" and reports[-1]["step"] == 30
    summary = json.loads((in_tmp / "run" / "summary.json").read_text())
    assert summary["step"] == 30 and summary["config"]["model.n_embd"] == 32  # the saved config, not the defaults
    capsys.readouterr()
    assert main(["--resume", "run/checkpoint", "model.n_embd=64", "--no-wandb"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.n_embd cannot change on --resume" in line and "train.steps" in line


@pytest.mark.parametrize("how", ["train.steps", "train.epochs"])
def test_resuming_a_run_that_reached_its_steps_changes_nothing(in_tmp, capsys, how):
    """A finished run resumed (as written: no new length; with epochs, the Trainer finds out) says so in one line,
    exits 0 and leaves every file as it was, byte for byte; a larger train.steps trains on from there."""
    from lmtune.train import main

    length = ["train.steps=10"] if how == "train.steps" else ["train.epochs=0.0005"]
    assert main([*TINY, *length, "train.eval_interval=5", "--out", "run", "--no-wandb"]) == 0
    files = {p.name: p.read_bytes() for p in (in_tmp / "run").iterdir() if p.is_file()}
    finished_at = json.loads(files["summary.json"])["step"]
    capsys.readouterr()
    for _ in range(2):
        assert main(["--resume", "run/checkpoint", "--no-wandb"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert out[-1] == (f"lmtune.train: run/checkpoint is at step {finished_at} and this run has {finished_at} "
                           f"step(s): nothing to train, nothing changed. Give train.steps=N above {finished_at} to "
                           f"train on.")
        assert {p.name: p.read_bytes() for p in (in_tmp / "run").iterdir() if p.is_file()} == files
    if how == "train.steps":
        assert len(out) == 1  # the one line, nothing before it
        assert main(["--resume", "run/checkpoint", "train.steps=15", "--no-wandb"]) == 0
        summary = json.loads((in_tmp / "run" / "summary.json").read_text())
        assert summary["step"] == 15 and summary["resumed_from_step"] == 10 and summary["tokens_per_s"] > 0


def test_describe_shows_the_value_a_run_uses_and_its_layer(in_tmp, capsys):
    from lmtune.train import main

    assert main(["--describe", "train.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "train.lr = 0.001   (a number (> 0.0))   <- command line" in out
    assert "train.ac_budget = 0.75   (a number (>= 0.0, <= 1.0))   <- locked lmtune/locked_defaults.toml" in out
    assert "model.n_layer = 12   (an integer (>= 1))   <- built-in" in out
    assert main(["--describe", "train.compile=false"]) == 0
    out = capsys.readouterr().out
    assert "train.ac_budget = 1.0" in out and "measured with ac_mode=budget, not applied to this blocks-mode run" in out


def test_checkpoint_replay_window_spans_two_checkpoint_intervals(tmp_path):
    import torch

    from lmtune.contract import CHECKPOINT_FILE

    Trainer(tiny("train.steps=30", "train.eval_interval=10", "train.log_interval=5"), out_dir=tmp_path).fit()
    state = torch.load(tmp_path / "checkpoint" / CHECKPOINT_FILE, weights_only=False)
    # The final checkpoint (step 30) holds the reports after the step-10 checkpoint through its own.
    assert [(m["step"], m["status"]) for m in state["reports"]][0] == (15, "running")
    assert state["reports"][-1]["step"] == 30 and state["reports"][-1]["status"] == "ok"


def test_a_kill_while_a_checkpoint_is_replaced_leaves_the_previous_one_to_resume_from(tmp_path, monkeypatch):
    """Replacing a checkpoint moves the old one aside before the new one takes its name: a kill between the two
    renames (emulated: the second rename never happens) leaves checkpoint.old, which --resume then reads."""
    from lmtune.training import checkpoint as ckpt

    Trainer(tiny("train.steps=10", "train.eval_interval=10"), out_dir=tmp_path).fit()
    real_rename = Path.rename

    def killed_before_the_new_one_is_in_place(self, target):
        if self.name == "checkpoint.tmp":
            raise KeyboardInterrupt  # as if SIGKILLed here: nothing after this line runs
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_new_one_is_in_place)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny("train.steps=20", "train.eval_interval=10"), out_dir=tmp_path, resume_from=tmp_path / "checkpoint").fit()
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint").exists() and (tmp_path / "checkpoint.old" / "checkpoint.pt").is_file()
    assert ckpt.read_checkpoint(tmp_path / "checkpoint")["step"] == 10
    resumed = Trainer(tiny("train.steps=20", "train.eval_interval=10"), resume_from=tmp_path / "checkpoint").fit()
    assert resumed["step"] == 20 and resumed["resumed_from_step"] == 10


# --- device truth: the paths that differ on a GPU, through their CPU seams --------------------------


def test_checkpoint_is_read_onto_the_cpu_whatever_the_training_device(tmp_path, monkeypatch):
    """torch.load(map_location=<the model's device>) made the saved RNG ByteTensors CUDA tensors on a GPU, which
    torch.set_rng_state refuses: every GPU resume failed. The state is read onto the CPU; load_state_dict moves
    each tensor to its parameter."""
    import lmtune.training.checkpoint as train_module

    Trainer(tiny("train.steps=10"), out_dir=tmp_path / "part").fit()
    seen = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(train_module.torch, "load", recording_load)
    Trainer(tiny(), resume_from=tmp_path / "part" / "checkpoint").fit()
    assert seen == ["cpu"]
    state = train_module.read_checkpoint(tmp_path / "part" / "checkpoint")
    assert state["rng"]["torch"].device.type == "cpu" and state["rng"]["torch"].dtype == torch.uint8


def counting_backend(graphs: list):
    def backend(gm, example_inputs):
        # The activations a region is compiled for: (B, T, C) inputs (parameters come in as 1-D and 2-D inputs).
        graphs.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 3))
        return gm.forward

    return backend


def test_measuring_steps_do_not_recompile_after_warmup(monkeypatch):
    """The coherence / noise measurement used to split a micro-batch into halves: a new shape, so a compiled
    model recompiled after warmup and the compile landed in the timings and peaks. It now masks targets
    instead; a counting backend sees no graph compiled after the warmup ends."""
    graphs: list = []
    real_compile = torch.compile  # nn.Module.compile (the blocks) calls it too
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting_backend(graphs)))
    at_window = []
    real_begin = Trainer._begin_memory_window

    def begin(self):
        real_begin(self)
        at_window.append(len(graphs))

    monkeypatch.setattr(Trainer, "_begin_memory_window", begin)
    torch._dynamo.reset()
    try:
        summary = Trainer(tiny("train.compile=true", "train.measure_interval=3", "train.steps=12")).fit()
    finally:
        torch._dynamo.reset()
    assert summary["status"] == "ok" and "grad_coherence" in summary
    assert at_window and graphs and len(graphs) == at_window[0], graphs  # nothing after the window opened
    assert {shape for g in graphs for shape in g} == {(4, 32, 32)}  # one micro-batch shape, train and eval


def test_a_resumed_run_leaves_its_own_warmup_out_of_the_step_times(tmp_path, monkeypatch):
    """Through the step timer's clock: each process's first compile_warmup_steps take 1 s (they compile), the
    others 10 ms. Before, a resumed process never saw step == compile_warmup_steps and timed its compile."""
    now = [1000.0]
    real = Trainer._optimizer_step

    def step_takes_time(self, k, measuring, log_now):
        now[0] += 1.0 if self.timer.process_steps < self.cfg.train.compile_warmup_steps else 0.010
        return real(self, k, measuring, log_now)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_takes_time)
    clock = lambda: now[0]  # noqa: E731
    full = Trainer(tiny("train.steps=30"), clock=clock).fit()
    Trainer(tiny("train.steps=10"), out_dir=tmp_path / "part", clock=clock).fit()
    resumed = Trainer(tiny("train.steps=30"), resume_from=tmp_path / "part" / "checkpoint", clock=clock).fit()
    assert full["avg_step_time_ms"] == pytest.approx(10.0)
    assert resumed["avg_step_time_ms"] == pytest.approx(10.0)
    assert resumed["tokens_per_s"] == pytest.approx(4 * 32 / 0.010)


def test_a_measurement_without_signal_drops_the_old_noise_scale(monkeypatch):
    from lmtune.training.measure import GradientNoise

    calls = []
    real = GradientNoise.estimate

    def first_only(self, *args):
        out = real(self, *args)
        calls.append(out)
        if len(calls) > 1:
            out.pop("noise_scale", None)  # as when the |G|² estimate is not positive
        return out

    monkeypatch.setattr(GradientNoise, "estimate", first_only)
    trainer = Trainer(tiny("train.steps=20", "train.measure_interval=5"))
    summary = trainer.fit()
    assert "noise_scale" in trainer.history[0]  # step 5: measured
    assert "noise_scale" not in summary and all("noise_scale" not in m for m in trainer.history[1:])


def test_identical_micro_batches_have_coherence_one(monkeypatch):
    """k micro-batches of the same sequences give k equal gradient samples: coherence exactly 1, and no noise
    (tr Σ = 0) to estimate a noise scale from. A GradientNoise returning constants fails this."""
    real_setup = Trainer._setup

    def fixed_batches(self):
        real_setup(self)
        x, y = self.batches.next()
        x, y = x[:1].repeat(x.shape[0], 1), y[:1].repeat(x.shape[0], 1)  # every row alike: halves alike too
        self.batches.next = lambda: (x.clone(), y.clone())

    monkeypatch.setattr(Trainer, "_setup", fixed_batches)
    for extra in ("train.accumulation_steps=2", "train.accumulation_steps=1"):  # two micro-batches; two halves
        summary = Trainer(tiny(extra, "train.steps=10", "train.measure_interval=5")).fit()
        assert summary["grad_coherence"] == pytest.approx(1.0, abs=1e-5)
        assert "noise_scale" not in summary


def test_mfu_is_tokens_per_s_times_flops_per_token_over_the_peak(monkeypatch):
    monkeypatch.setattr("lmtune.device.CPUAccelerator.peak_flops", lambda self: 1e9)
    summary = Trainer(tiny()).fit()
    flops = 6 * 33_664 + 12 * 2 * 2 * 16 * 32  # 6N + 12·L·H·Q·T: N by hand (test_measure), L=2, H=2, Q=16, T=32
    assert summary["mfu"] == pytest.approx(summary["tokens_per_s"] * flops / 1e9)


def test_cpu_allocator_failure_is_an_oom_result(monkeypatch):
    """A real allocation the CPU allocator refuses (RuntimeError from DefaultCPUAllocator) ends the run as oom."""
    real = Trainer._forward_backward

    def huge(self, k, measuring):
        if self.step == 4:
            torch.empty(2**52, dtype=torch.uint8)
        return real(self, k, measuring)

    monkeypatch.setattr(Trainer, "_forward_backward", huge)
    summary = Trainer(tiny()).fit()
    assert summary["status"] == "oom" and summary["step"] == 4
    assert "can't allocate memory" in summary["oom_reason"]


def test_every_micro_batch_size_is_scored_on_the_same_validation_text():
    """Same weights (same seed), micro-batch 2, 3 or 8: one validation loss (eval_sequences fixed)."""
    losses_by_mb = []
    for mb in (2, 3, 8):
        t = Trainer(tiny(f"train.micro_batch_size={mb}", "train.eval_sequences=24"))
        t._setup()
        losses_by_mb.append(t._evaluate()["val_loss"])
    assert losses_by_mb == pytest.approx([losses_by_mb[0]] * 3, rel=1e-5)


ACTIVATIONS = ("model.n_layer=4", "model.n_embd=64", "model.n_head=2", "model.block_size=64", "data.seq_len=64",
               "train.steps=4", "train.eval_interval=4", "train.measure_interval=0", "train.log_interval=2",
               "train.checkpoint=false")
"""A run whose activations dominate its tensor memory (4 blocks, 64 positions, micro-batch 16)."""


def peak_mib(*extra: str) -> float:
    return Trainer(tiny(*ACTIVATIONS, *extra)).fit()["peak_allocated_gib"] * 1024


def test_cpu_peak_falls_with_the_ac_budget_and_rises_with_the_micro_batch_eager():
    peaks = [peak_mib("train.micro_batch_size=16", f"train.ac_budget={b}") for b in (1.0, 0.5, 0.0)]
    assert peaks[0] > peaks[1] > peaks[2] and peaks[2] < 0.6 * peaks[0], peaks
    assert peak_mib("train.micro_batch_size=8") < 0.7 * peaks[0]


@pytest.mark.slow
def test_cpu_peak_falls_with_the_ac_budget_compiled():
    """Compiled per block, the partitioner's budget lowers the peak monotonically (one whole-model graph did
    not: at 0.0 it peaked as high as at 1.0)."""
    torch._dynamo.reset()
    try:
        peaks = [peak_mib("train.compile=true", "train.micro_batch_size=16", f"train.ac_budget={b}") for b in (1.0, 0.5, 0.0)]
    finally:
        torch._functorch.config.activation_memory_budget = 1.0
        torch._dynamo.reset()
    assert peaks[0] > peaks[1] > peaks[2] and peaks[2] < 0.6 * peaks[0], peaks


def test_a_runs_fingerprint_holds_its_config_data_code_torch_and_device(tmp_path, monkeypatch):
    from lmtune.training import fingerprint as fp

    a = Trainer(tiny("train.steps=4")).fit()
    assert a["fingerprint"] == Trainer(tiny("train.steps=4")).fit()["fingerprint"]  # the same run: the same digest
    assert Trainer(tiny("train.steps=5")).fit()["fingerprint"] != a["fingerprint"]  # the config
    assert Trainer(tiny("train.steps=4", "data.val_fraction=0.2")).fit()["fingerprint"] != a["fingerprint"]  # data
    fp.code_digest.cache_clear()
    monkeypatch.setattr(fp, "PACKAGE", tmp_path)  # another lmtune: a one-character change of its source
    (tmp_path / "trainer.py").write_text("x = 1\n")
    try:
        assert Trainer(tiny("train.steps=4")).fit()["fingerprint"] != a["fingerprint"]
    finally:
        monkeypatch.undo()
        fp.code_digest.cache_clear()
    assert a["fingerprint_code"] == fp.code_digest()[:16] and a["fingerprint_data"].startswith("cache:")
