"""A sweep's report, written into its results directory (``python -m lmtune.report RESULTS_DIR``): each result kind's
parts (:mod:`lmtune.results.kinds`) gathered into summary.md, plots/ and report.html.

Works on a finished or a running sweep (it reads whatever trials have reported so far) and writes into
the results directory::

    frontier.md|csv|json        memory frontier per AC budget + recommended operating point (frontier sweeps)
    replicates.csv              sweeps over seeds: per arm n, mean, sd, 95% interval, the paired difference against
                                the baseline arm and its verdict
    summary.md                  what the sweep found (the best trial, or the Pareto front; the best arm by mean),
                                every trial sorted by the metric, the cost, then each kind's tables (norm × warmup,
                                batch × LR, width transfer, replicates)
    plots/frontier.png          micro-batch vs peak memory and vs throughput per budget, OOMs marked, limit drawn
    plots/loss_curves.png       train and validation loss vs tokens, one colour per trial
    plots/pareto.png            sweeps with several metrics: the first two, every ok trial, the Pareto front
    plots/grad_norm_layers.png  final per-layer gradient norm (log10) per trial, for norm sweeps
    plots/grad_norm_over_time.png  per-layer gradient norm (log10) against step, one panel per trial, for
                                norm sweeps: where the phase-0 study saw post-LN's ~10 orders of magnitude open up
    plots/width_transfer.png    width × lr sweeps: the metric against the lr per width, each width's optimum
    plots/replicates.png        sweeps over seeds: each seed, and each arm's mean with its 95% interval
    report.html                 all of the above on one self-contained page, with per-trial curves, each
                                trial's evidence, the cost in device-hours and the export's table

The sweep runner calls :func:`render` when a sweep ends (:func:`lmtune.reporting.console.print_report`); the command
line (``lmtune/report.py``) prints the tables and the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lmtune.contract import PLOTS_DIR, REPORT_HTML, SUMMARY_MD
from lmtune.reporting.page import write_html
from lmtune.results.kinds import Kind, applicable
from lmtune.results.read import Results, load_results


def render(results_dir: str | Path) -> list[Path]:
    """Write the tables and plots of a results directory; returns the files written.

    Raises ConfigError when ``results_dir`` is not a results directory.
    """
    results = load_results(results_dir)
    kinds = applicable(results)
    written = [path for kind in kinds for path in kind.files(results)]
    summary = results.dir / SUMMARY_MD
    summary.write_text(summary_markdown(results, kinds))
    written.append(summary)
    plots = results.dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    written += [path for kind in kinds for path in kind.plots(results, plots)]
    written.append(write_html(results, kinds, written, results.dir / REPORT_HTML))
    return written


def summary_markdown(results: Results, kinds: Sequence[Kind] | None = None) -> str:
    """``summary.md``: what the sweep found, then each kind's tables (every trial's first)."""
    kinds = applicable(results) if kinds is None else kinds
    objectives = ", ".join(f"{m} ({mode})" for m, mode in results.objectives)
    lines = [f"# Sweep summary: {results.name}", "",
             f"Group: {results.group}. {'Objectives' if len(results.objectives) > 1 else 'Metric'}: {objectives}.", ""]
    lines += [line for kind in kinds for line in kind.found(results)]
    lines += [line for kind in kinds for line in kind.tables(results)]
    return "\n".join(lines)
