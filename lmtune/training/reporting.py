"""Where a run's reports go: its history, ``metrics.jsonl``, the W&B run, the ``report`` callable, samples and the
summary (docs/CONTRACTS.md, "Trainer"). wandb and tqdm are imported only when used: a machine with torch,
numpy and tiktoken only (the GPU check) runs the trainer without them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from lmtune.config import Config
from lmtune.contract import METRICS_JSONL, SAMPLES_TXT, SUMMARY_JSON, SUMMARY_METRICS, layer_keys
from lmtune.results.layout import keep_reports, order

Report = Callable[[dict[str, Any], "str | None"], None]
"""``report(metrics, checkpoint_dir)``: called on every rank with the same metrics; a directory on rank 0 only."""


def wandb_mode() -> str:
    """online when an API key is configured, else offline: never a prompt, never a network failure."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class Reporter:
    """A run's reports: every one in :attr:`history`, the latest value of every metric in :attr:`last`.

    Only rank 0 (``is_main``) writes files (``out_dir``: metrics.jsonl, samples.txt, summary.json) and logs to
    W&B (``wandb``: None, or kwargs for ``wandb.init``); the ``report`` callable is called on every rank.
    """

    def __init__(self, cfg: Config, out_dir: Path | None, report: Report | None, wandb: dict | None, *,
                 is_main: bool):
        self.cfg = cfg
        self.out_dir = out_dir
        self.report = report
        self.wandb_kwargs = wandb
        self.is_main = is_main
        self.history: list[dict[str, Any]] = []
        """Every report, starting with those of the checkpoint the run resumed from."""
        self.last: dict[str, Any] = {}
        """The latest value of every metric (what the summary is made of)."""
        self._wandb_run: Any = None

    def start(self, replay: list[dict[str, Any]]) -> None:
        """Before the first step: the history goes on from ``replay`` (the resumed checkpoint's reports), and so
        does metrics.jsonl (a stream that went on past the checkpoint: from there on again); the W&B run."""
        self.history = list(replay)
        if self.is_main and self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if replay:
                last = order(replay[-1])
                keep_reports(self.out_dir / METRICS_JSONL, lambda at: at <= last)
        if self.is_main and self.wandb_kwargs is not None:
            self._init_wandb()

    def _init_wandb(self) -> None:
        import wandb

        kwargs = dict(self.wandb_kwargs)
        kwargs.setdefault("project", "lmtune")
        if kwargs.get("dir"):
            Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        self._wandb_run = wandb.init(
            config=self.cfg.flat(), mode=wandb_mode(), reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True), **kwargs,
        )

    def resend(self, reports: list[dict[str, Any]]) -> None:
        """Reports sent again through the ``report`` callable only (already recorded everywhere else)."""
        if self.report is not None:
            for report in reports:
                self.report(report, None)

    def emit(self, metrics: dict[str, Any], step: int,
             checkpoint: Callable[[list[dict[str, Any]]], str | None] | None = None) -> None:
        """Record and report ``metrics`` of ``step``; ``checkpoint(history)``, when given, saves a checkpoint
        holding this report first, and its directory goes with it."""
        if "loss" in metrics and "noise_scale" not in metrics:  # its latest measurement found no signal
            self.last.pop("noise_scale", None)
        self.history.append(metrics)
        checkpoint_dir = checkpoint(self.history) if checkpoint is not None else None
        self.last.update(metrics)
        if self.is_main:
            if self.out_dir:
                with open(self.out_dir / METRICS_JSONL, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if self._wandb_run is not None:
                self._wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.report is not None:
            self.report(metrics, checkpoint_dir if self.is_main else None)

    def sample(self, text: str, step: int) -> None:
        """A text sampled at ``step``: into samples.txt and the W&B run."""
        if self.out_dir:
            with open(self.out_dir / SAMPLES_TXT, "a") as f:
                f.write(f"--- step {step} ---\n{text}\n")
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({"samples": wandb.Html(f"<pre>step {step}\n{text}</pre>")}, step=step)

    def final_metrics(self) -> dict[str, Any]:
        """What the last report carries of the run so far: the summary metrics, per-layer norms, an OOM's reason."""
        last = self.last
        final = {k: last[k] for k in SUMMARY_METRICS if k in last}
        final.update({k: last[k] for k in layer_keys(last)})
        if "oom_reason" in last:
            final["oom_reason"] = last["oom_reason"]
        return final

    def summary(self) -> dict[str, Any]:
        """The run's summary (the latest value of every metric and the flat config): summary.json, W&B's."""
        summary = {**self.last, "config": self.cfg.flat()}
        if self.is_main and self.out_dir:
            (self.out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, default=str))
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: v for k, v in self.last.items() if isinstance(v, (int, float, str))})
        return summary

    def close(self) -> None:
        """Finish the W&B run (also for a run stopped by an exception: a complete run stays behind)."""
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None



class Progress:
    """A tqdm bar of the steps on stderr when ``shown`` (and tqdm is there), else nothing."""

    def __init__(self, shown: bool, total: int, initial: int):
        self.bar = None
        if not shown:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # a machine with torch, numpy and tiktoken only (the GPU check): no bar
            return

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics.get('tokens_per_s', 0):.0f}")
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
