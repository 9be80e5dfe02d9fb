"""Export a sweep's winner as locked defaults: ``python -m lmtune.export RESULTS_DIR [--to PATH] [--force]
[--trial ID] [--for-width N] [--validate N] [--for-compute C [--verify [--verify-flops C2]]]``.

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

``--for-compute C`` writes, from a scaling ladder (a sweep over ``train.flops`` and the model's size,
sweeps/isoflop.py), the run its laws call for at a budget of C training FLOPs (:mod:`lmtune.exporting.compute`): the
width nearest N*(C) that the model accepts, the ladder's depth and heads, ``train.flops=C``, μP's base width and the
lr, the batch; each key's provenance holds the predicted loss with its 90% interval (``predicted_loss``,
``predicted_low``, ``predicted_high``), the tokens and steps. A C below the smallest fitted budget is refused.
``--verify`` first trains such a run on this machine (the one for ``--verify-flops C2``, a smaller budget, when
given) and says whether its loss falls inside the predicted interval; the provenance records it (``verified``:
inside | outside | no); outside, nothing is written without ``--force``.

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
from lmtune.exporting.compute import ComputeRun, compute_run, compute_winner, verified, verify
from lmtune.exporting.locked import check_export, write_export
from lmtune.exporting.plan import ExportPlan, Winner, plan_export
from lmtune.exporting.validate import VALIDATE_TOLERANCE, percent, validate
from lmtune.results.format import fmt
from lmtune.results.read import Results, load_results

# --- command line ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--for-compute", type=float, metavar="C", help="a scaling ladder's (sweeps/isoflop.py) run for a "
                    "compute budget of C training FLOPs: the width its laws call for, train.flops=C, with the "
                    "predicted loss and its 90%% interval in the provenance")
    ap.add_argument("--verify", action="store_true", help="with --for-compute: first train such a run on this "
                    "machine and check its loss against the predicted interval (outside: nothing written without "
                    "--force)")
    ap.add_argument("--verify-flops", type=float, metavar="C2", help="with --verify: train the ladder's run for this "
                    "smaller, affordable budget (between the smallest fitted one and C) instead of C itself")
    return ap


def _check_options(args: argparse.Namespace) -> float:
    """Refuse combinations that mean nothing; returns the --validate tolerance."""
    if args.to is not None:
        check_output_file(args.to, "--to")
    if args.validate is not None and args.validate < 1:
        raise ConfigError(f"--validate {args.validate}: expected a number of steps (an integer >= 1, e.g. 200).")
    if args.tolerance is not None and args.validate is None:
        raise ConfigError(f"--tolerance {args.tolerance}: it is the drift --validate allows, and there is no --validate; "
                          f"accepted: --validate N --tolerance R.")
    if args.verify_flops is not None and not args.verify:
        raise ConfigError(f"--verify-flops {args.verify_flops:g}: it is the budget --verify trains, and there is no "
                          f"--verify; accepted: --for-compute C --verify --verify-flops C2.")
    if args.verify and args.for_compute is None:
        raise ConfigError("--verify checks a scaling ladder's prediction; accepted: --for-compute C --verify.")
    if args.for_compute is not None:
        other = [o for o, v in (("--trial", args.trial), ("--for-width", args.for_width), ("--validate", args.validate))
                 if v is not None]
        if other:
            raise ConfigError(f"--for-compute exports the ladder's fitted run, not a trial: it does not go with "
                              f"{', '.join(other)}; accepted: --for-compute C [--verify [--verify-flops C2]].")
    tolerance = VALIDATE_TOLERANCE if args.tolerance is None else args.tolerance
    if not 0 < tolerance < 10:
        raise ConfigError(f"--tolerance {tolerance}: expected a relative drift between 0 and 10 (0.2 = ±20%).")
    return tolerance


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(_parser(), argv)
    tolerance = _check_options(args)
    results = load_results(args.results_dir)
    run = compute_run(results, args.for_compute) if args.for_compute is not None else None
    chosen = compute_winner(results, run) if run is not None else None
    plan = plan_export(results, args.to, trial=args.trial, for_width=args.for_width, chosen=chosen)
    existed = plan.path.exists()
    _announce(plan, results, args)
    if args.validate is not None:
        check = validate(results, plan, args.validate, tolerance=tolerance)
        print("\n".join(check.lines))
        if not check.passed:
            print(f"nothing written: {plan.path} keeps what it had." if existed else
                  f"nothing written ({plan.path} was not made).")
            return 1
    if args.verify:
        plan = _verified(results, args, run, chosen, existed)
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


def _announce(plan: ExportPlan, results: Results, args: argparse.Namespace) -> None:
    """Say what the export would write and what would change; raise what refuses it (after saying so, and before
    any --validate or --verify run: it would be refused anyway)."""
    try:
        check_export(plan, results, force=args.force)
        refused = None
    except ConfigError as e:  # said after what would change (the line says to apply it)
        refused = e
    if plan.unchanged:
        doing = "unchanged, it already holds these values"
    elif refused is not None:
        doing = "would change" if plan.path.exists() else "would write"
    else:
        doing = "writing"
    chosen = "chosen" if args.trial else "for compute" if args.for_compute is not None else "winner"
    print(f"{plan.path}: {doing} ({chosen}: {plan.winner.label} of {results.group}, {plan.winner.metric} = "
          f"{fmt(plan.winner.metric_value, plan.winner.metric)}"
          + (f" predicted, {plan.winner.record['interval_level']:.0%} interval [{plan.winner.record['predicted_low']:.4g}, "
             f"{plan.winner.record['predicted_high']:.4g}]" if args.for_compute is not None else "") + ")")
    print("\n".join(plan.changes))
    if refused is not None:
        raise refused


def _verified(results: Results, args: argparse.Namespace, run: ComputeRun, chosen: Winner,
              existed: bool) -> ExportPlan:
    """--verify: train the ladder's run (at --verify-flops C2, else C), say inside or outside the predicted
    interval; the plan again with the verification in its provenance, or a refusal when outside without --force."""
    target = run
    if args.verify_flops is not None:
        if args.verify_flops > args.for_compute:
            raise ConfigError(f"--verify-flops {args.verify_flops:g} is above --for-compute {args.for_compute:g}: it "
                              f"is a smaller, affordable budget to check the laws with; accepted: at most C.")
        target = compute_run(results, args.verify_flops)
    check = verify(results, target)
    print("\n".join(check.lines))
    if not check.inside and not args.force:
        kept = f"{args.to or PROJECT_LOCKED} keeps what it had" if existed else "nothing written"
        raise ConfigError(f"--verify: {results.metric} {check.record['verify_loss']:.4g} is outside the predicted "
                          f"interval [{check.record['verify_low']:.4g}, {check.record['verify_high']:.4g}]; {kept}. "
                          f"Rerun with --force to write it anyway (its provenance says verified = \"outside\").")
    return plan_export(results, args.to, chosen=verified(chosen, check))


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
