"""A sweep's tables and plots, written into its results directory (``python -m lmtune.report RESULTS_DIR``).

Works on a finished or a running sweep (it reads whatever trials have reported so far) and writes into
the results directory::

    frontier.md|csv|json        memory frontier per AC budget + recommended operating point (frontier sweeps)
    summary.md                  every trial sorted by the metric (+ norm × warmup, batch × LR tables)
    plots/frontier.png          micro-batch vs peak memory and vs throughput per budget, OOMs marked, limit drawn
    plots/loss_curves.png       train and validation loss vs tokens, one colour per trial
    plots/pareto.png            sweeps with several metrics: the first two, every ok trial, the Pareto front
    plots/grad_norm_layers.png  final per-layer gradient norm (log10) per trial, for norm sweeps
    plots/grad_norm_over_time.png  per-layer gradient norm (log10) against step, one panel per trial, for
                                norm sweeps: where the phase-0 study saw post-LN's ~10 orders of magnitude open up
    report.html                 all of the above on one self-contained page, with per-trial curves, each
                                trial's evidence, the cost in device-hours and the export's table

The sweep runner calls :func:`render` when a sweep ends (:func:`lmtune.reporting.console.print_report`); the command
line (``lmtune/report.py``) prints the tables and the files.
"""

from __future__ import annotations

from pathlib import Path

from lmtune.contract import REPORT_HTML, SUMMARY_MD
from lmtune.results.frontier import frontier_report, write_frontier
from lmtune.results.read import load_results
from lmtune.results.summary import summary_markdown


def render(results_dir: str | Path) -> list[Path]:
    """Write the tables and plots of a results directory; returns the files written.

    Raises ConfigError when ``results_dir`` is not a results directory.
    """
    results = load_results(results_dir)
    written: list[Path] = []
    rep = frontier_report(results)
    if rep is not None:
        written += write_frontier(rep, results.dir, title=f"{results.name} ({results.group})")
    summary = results.dir / SUMMARY_MD
    summary.write_text(summary_markdown(results))
    written.append(summary)
    from lmtune.reporting.page import write_html  # matplotlib: loaded when plots are drawn
    from lmtune.results.plots import render_plots

    written += render_plots(results, rep)
    written.append(write_html(results, written, results.dir / REPORT_HTML))
    return written


