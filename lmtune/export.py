"""Export a sweep's winner as locked defaults: ``python -m lmtune.export RESULTS_DIR [--to PATH] [--force]
[--validate N]``.

Writes the keys the sweep file locks (``Sweep.export``, recorded in sweep.json) with the winner's values:

* a frontier sweep's winner is its recommended operating point (highest throughput with the headroom kept);
* any other sweep's winner is its best ``ok`` trial by the sweep's metric and mode;
* a sweep with several metrics has no single winner: ``--trial ID`` picks a point of its Pareto front
  (``--trial`` exports any ``ok`` trial of any sweep).

Two files: the TOML the trainer reads (default ``./lmtune.locked.toml``, the project's locked defaults;
any path works with ``--locked PATH`` or ``$LMTUNE_LOCKED``), with a ``[provenance."section.key"]`` record
per key (source, sweep, group, metric, value, trial_id, date), and next to it (same stem, ``.md``) the
phase-0-style ``Parameter | Value | Source`` table.

An existing TOML is never overwritten without ``--force``; either way the command shows what would
change (old → new per key). With ``--force`` the keys this export does not touch are kept, with their
provenance, so the locked defaults of several sweeps accumulate in one file.

``--validate N`` first runs N fresh steps at the winner's config on this machine and compares tokens/s, peak
memory and headroom with what the sweep measured; nothing is written when they disagree (exit 1).
"""

from __future__ import annotations

import argparse
import sys

from lmtune.cli import check_output_file, user_errors_exit_2
from lmtune.config import PROJECT_LOCKED, ConfigError
from lmtune.results.export import VALIDATE_TOLERANCE, check_export, plan_export, validate, write_export
from lmtune.results.format import fmt
from lmtune.results.read import load_results


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lmtune.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir", metavar="RESULTS_DIR", help="a sweep's results directory (it has sweep.json)")
    ap.add_argument("--to", metavar="PATH", default=None,
                    help=f"where to write the TOML (default: {PROJECT_LOCKED}, the project's locked defaults)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing file (its other keys are kept)")
    ap.add_argument("--validate", type=int, metavar="N", help="first run N fresh steps at the winner's config on "
                    "this machine and compare tokens/s, peak memory and headroom with the sweep's; write only if it "
                    "holds (exit 1 otherwise)")
    ap.add_argument("--tolerance", type=float, default=VALIDATE_TOLERANCE, metavar="R",
                    help=f"--validate: largest relative drift of tokens/s (default {VALIDATE_TOLERANCE}: ±20%%)")
    ap.add_argument("--trial", metavar="ID", help="export this ok trial instead of the winner (required for a sweep "
                                                   "with several metrics: a point of its Pareto front)")
    args = ap.parse_args(argv)
    if args.to is not None:
        check_output_file(args.to, "--to")
    if args.validate is not None and args.validate < 1:
        raise ConfigError(f"--validate {args.validate}: expected a number of steps (an integer >= 1, e.g. 200).")
    if not 0 < args.tolerance < 10:
        raise ConfigError(f"--tolerance {args.tolerance}: expected a relative drift between 0 and 10 (0.2 = ±20%).")
    results = load_results(args.results_dir)
    plan = plan_export(results, args.to, trial=args.trial)
    print(f"{plan.path}: {'would change' if plan.path.exists() and not args.force else 'writing'} "
          f"({'chosen' if args.trial else 'winner'}: trial {plan.winner.row.get('trial_id')} of {results.group}, {plan.winner.metric} = "
          f"{fmt(plan.winner.metric_value, plan.winner.metric)})")
    print("\n".join(plan.changes))
    if args.validate is not None:
        check_export(plan, results, force=args.force)  # refused anyway: say so before the run
        check = validate(results, plan, args.validate, tolerance=args.tolerance)
        print("\n".join(check.lines))
        if not check.passed:
            print(f"nothing written: {plan.path} keeps what it had.")
            return 1
    write_export(plan, results, force=args.force)
    print(f"written: {plan.path} and {plan.path.with_suffix('.md')}")
    mode = plan.provenance.get("train.ac_budget", {}).get("ac_mode")
    if mode:
        print(f"note: train.ac_budget={plan.values['train.ac_budget']} was measured with ac_mode={mode} "
              f"(train.compile={'true' if mode == 'budget' else 'false'}); runs in the other mode keep their own.")
    print("the trainer now uses them: python -m lmtune.train"
          + ("" if plan.path.resolve() == PROJECT_LOCKED.resolve() else f" --locked {plan.path}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
