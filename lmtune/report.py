"""Render a sweep's tables and plots: ``python -m lmtune.report RESULTS_DIR``.

Works on a finished or a running sweep (it reads whatever trials have reported so far); writes the frontier
tables, summary.md, the plots and report.html into the results directory (:mod:`lmtune.reporting.render` lists
them), prints the main table and the files written.
"""

from __future__ import annotations

import argparse
import sys

from lmtune.cli import parse_command_line, user_errors_exit_2
from lmtune.contract import FRONTIER_STEM, SUMMARY_MD, TRIALS_CSV
from lmtune.reporting import render
from lmtune.results.read import load_results


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmtune.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir", metavar="RESULTS_DIR", help="a sweep's results directory (it has sweep.json)")
    args = parse_command_line(ap, argv)
    written = render(args.results_dir)
    results = load_results(args.results_dir)
    running = [r for r in results.rows if r.get("status") == "running"]
    if not (results.dir / TRIALS_CSV).is_file() or running:
        print(f"(sweep still running: {len(results.rows) - len(running)} trial(s) finished, {len(running)} running)\n")
    shown = results.dir / (f"{FRONTIER_STEM}.md" if results.frontier_spec else SUMMARY_MD)
    print(shown.read_text())
    print("written:")
    for p in written:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
