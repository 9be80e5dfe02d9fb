"""Export a sweep's winner as locked defaults: ``python -m lmtune.export RESULTS_DIR [--to PATH] [--force]
[--trial ID] [--for-width N] [--validate N]``.

Writes the keys the sweep file locks (``Sweep.export``, recorded in sweep.json) with the winner's values:

* a frontier sweep's winner is its recommended operating point (highest throughput with the headroom kept);
* a sweep that repeats its configurations over seeds (``train.seed``) locks the arm with the best mean over its
  ``ok`` seeds, not its luckiest seed; the output and every key's provenance say so (``replicates``,
  ``arm_trial_ids``);
* any other sweep's winner is its best ``ok`` trial by the sweep's metric and mode;
* a sweep with several metrics has no single winner: ``--trial ID`` picks a point of its Pareto front
  (``--trial`` exports any ``ok`` trial of any sweep).

Two files: the TOML the trainer reads (default ``./lmtune.locked.toml``, the project's locked defaults;
any path works with ``--locked PATH`` or ``$LMTUNE_LOCKED``), with a ``[provenance."section.key"]`` record
per key (source, sweep, group, metric, value, trial_id, date), and next to it (same stem, ``.md``) the
phase-0-style ``Parameter | Value | Source`` table.

An existing TOML is never overwritten without ``--force``; either way the command shows what would
change (old → new per key). With ``--force`` the keys this export does not touch are kept, with their
provenance, so the locked defaults of several sweeps accumulate in one file. A file that already holds the
winner's values, from the same trial, is left as it is (no ``--force`` needed: nothing changes). The command ends
with the trainer command that uses the values, on the model they were measured with (:func:`trainer_command`).

``--for-width N`` writes them for a model N wide: a μP trial's tuned values hold at any width
(``model.parametrization="mup"`` with the base width they are relative to as ``model.base_width``: the trial's own,
else its width; locked with them; the provenance says "tuned at width w, transferred to N by μP (model.base_width=b)");
a standard-parametrization trial is refused, since its
best learning rate moves with the width. In a sweep over both parametrizations the winner is the best μP trial.

``--validate N`` first runs N fresh steps at the winner's config on this machine and compares tokens/s, peak
memory and headroom with what the sweep measured; nothing is written when they disagree (exit 1).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from lmtune import config as config_lib
from lmtune.cli import check_output_file, parse_command_line, user_errors_exit_2
from lmtune.config import PROJECT_LOCKED, ConfigError
from lmtune.exporting.locked import check_export, write_export
from lmtune.exporting.plan import ExportPlan, plan_export
from lmtune.exporting.validate import VALIDATE_TOLERANCE, percent, validate
from lmtune.results.format import fmt
from lmtune.results.read import Results, load_results

# --- command line ------------------------------------------------------------------------------------


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
    ap.add_argument("--tolerance", type=float, default=None, metavar="R",
                    help=f"with --validate: largest relative drift of tokens/s (default {VALIDATE_TOLERANCE}: "
                    f"±{percent(VALIDATE_TOLERANCE)}%%)")
    ap.add_argument("--for-width", type=int, metavar="N", help="the winner's values for a model N wide (model.n_embd), "
                    "carried by μP: only a model.parametrization=mup trial's values hold at another width")
    ap.add_argument("--trial", metavar="ID", help="export this ok trial instead of the winner (required for a sweep "
                                                   "with several metrics: a point of its Pareto front)")
    args = parse_command_line(ap, argv)
    if args.to is not None:
        check_output_file(args.to, "--to")
    if args.validate is not None and args.validate < 1:
        raise ConfigError(f"--validate {args.validate}: expected a number of steps (an integer >= 1, e.g. 200).")
    if args.tolerance is not None and args.validate is None:
        raise ConfigError(f"--tolerance {args.tolerance}: it is the drift --validate allows, and there is no --validate; "
                          f"accepted: --validate N --tolerance R.")
    tolerance = VALIDATE_TOLERANCE if args.tolerance is None else args.tolerance
    if not 0 < tolerance < 10:
        raise ConfigError(f"--tolerance {tolerance}: expected a relative drift between 0 and 10 (0.2 = ±20%).")
    results = load_results(args.results_dir)
    plan = plan_export(results, args.to, trial=args.trial, for_width=args.for_width)
    try:
        check_export(plan, results, force=args.force)
        refused = None
    except ConfigError as e:  # said after what would change (the line says to apply it)
        refused = e
    existed = plan.path.exists()
    if plan.unchanged:
        doing = "unchanged, it already holds these values"
    elif refused is not None:
        doing = "would change" if existed else "would write"
    else:
        doing = "writing"
    print(f"{plan.path}: {doing} ({'chosen' if args.trial else 'winner'}: {plan.winner.label} of "
          f"{results.group}, {plan.winner.metric} = {fmt(plan.winner.metric_value, plan.winner.metric)})")
    print("\n".join(plan.changes))
    if refused is not None:
        raise refused  # before a --validate run: it would be refused anyway
    if args.validate is not None:
        check = validate(results, plan, args.validate, tolerance=tolerance)
        print("\n".join(check.lines))
        if not check.passed:
            print(f"nothing written: {plan.path} keeps what it had." if existed else
                  f"nothing written ({plan.path} was not made).")
            return 1
    if plan.unchanged:
        print(f"nothing to write: {plan.path} already holds these values, from the same trial.")
    else:
        write_export(plan, results, force=args.force)
        print(f"written: {plan.path} and {plan.path.with_suffix('.md')}")
    mode = plan.provenance.get("train.ac_budget", {}).get("ac_mode")
    if mode:
        print(f"note: train.ac_budget={plan.values['train.ac_budget']} was measured with ac_mode={mode} "
              f"(train.compile={'true' if mode == 'budget' else 'false'}); runs in the other mode keep their own.")
    print(trainer_command(plan, results))
    return 0


def trainer_command(plan: ExportPlan, results: Results) -> str:
    """The command that trains with the exported values, on the model they were measured with.

    A bare ``python -m lmtune.train --locked FILE`` trains the trainer's own model (GPT-2 small unless the file or
    the project's locked defaults say otherwise): a micro-batch measured on a 4×128 byte model then ran out of memory
    at its first step. So the command carries the winner's keys in :data:`MEASURED_WITH` that the trainer would not
    use by itself with the file, and says what they are."""
    project = plan.path.resolve() == PROJECT_LOCKED.resolve()
    own = results.config_of(plan.winner.row)
    trainer = config_lib.load(locked=None if project else plan.path).flat()  # what the bare command would train
    keys = {k: own[k] for k in own if (k.startswith("model.") or k in MEASURED_WITH) and k not in plan.values
            and k in trainer and config_lib.coerce(k, own[k]) != trainer[k]}
    command = ["python", "-m", "lmtune.train", *([] if project else ["--locked", str(plan.path)])]
    command += [f"{k}={_cli_value(v)}" for k, v in keys.items()]
    line = " ".join(shlex.quote(a) for a in command)
    if not keys:
        return f"the trainer now uses them: {line}"
    return (f"the trainer now uses them, on the model and settings they were measured with (without these keys it "
            f"would train its own, {trainer['model.n_layer']} layers × {trainer['model.n_embd']}):\n  {line}")


MEASURED_WITH = ("data.seq_len", "data.tokenizer", "train.dtype", "train.compile", "system.device")
"""Beside every ``model.`` key: what the exported values' measurements depend on (memory, throughput, the
optimum), carried by the trainer command export prints."""


def _cli_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


if __name__ == "__main__":
    sys.exit(main())
