"""python -m lmtune.sweep SWEEP.py [--smoke] [--address ADDR] [--storage DIR|URI] [--resume]
[--max-concurrent N] [--no-dashboard] [section.key=value ...]

Everything about the sweep file, the overrides and the cluster address is checked before Ray is
imported: bad input is one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

from lmtune.cli import parse_command_line, user_errors_exit_2
from lmtune.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lmtune.sweep",
        description="Run a sweep file on Ray Tune + Optuna (embedded local Ray unless --address is given).",
    )
    p.add_argument("sweep_file", metavar="SWEEP.py", help="a sweep file, e.g. sweeps/norm_warmup.py")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="base config keys for every trial (not the space's axes)")
    p.add_argument("--smoke", action="store_true", help="the file's smoke variant: a CPU-sized run of a few minutes")
    p.add_argument("--address", metavar="ADDR", help="join a running cluster: auto, HOST:PORT or ray://HOST:PORT")
    p.add_argument("--storage", default="results", metavar="DIR|URI",
                   help="where results go (default ./results; a shared path or URI such as s3://… for multi-node)")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest interrupted run of this sweep in --storage")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="trials in flight at most (default: what fits)")
    p.add_argument("--gpus", metavar="N|auto", help="GPUs per worker of each trial (default: the sweep file's, "
                   "'auto' = 1 when the cluster has GPUs and the trials do not train on the CPU)")
    p.add_argument("--cpus", type=float, metavar="N", help="CPUs per worker of each trial (default: the sweep file's, 1)")
    p.add_argument("--no-wandb", action="store_true", help="no W&B runs (they are offline without an API key)")
    p.add_argument("--no-report", action="store_true", help="skip the tables and plots of lmtune.report at the end")
    p.add_argument("--rerun", action="store_true", help="train every trial, also those the storage already holds "
                   "finished (by default a trial with the same config, data, code, torch and device is reused)")
    p.add_argument("--warm-start", action="append", default=[], metavar="RESULTS",
                   help="seed the searcher's study with the finished trials of an earlier sweep (its results "
                   "directory; again for more): TPE's first suggestions then build on them")
    p.add_argument("--no-dashboard", action="store_true",
                   help="the embedded Ray without its dashboard (a headless run: ~3 CPU-seconds and ten processes "
                   "fewer; the console, TensorBoard and W&B still show progress)")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    args = parse_command_line(_parser(), argv, "SWEEP.py, section.key=value overrides")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent} is not accepted: expected an integer >= 1.")
    if args.no_dashboard and args.address:
        raise ConfigError("--no-dashboard applies to the embedded Ray only: a cluster's dashboard is the cluster's "
                          "(include_dashboard in cluster.yaml's `ray start`); accepted: --no-dashboard without --address.")
    if args.gpus is not None and args.gpus != "auto":
        try:
            args.gpus = float(args.gpus)
        except ValueError:
            raise ConfigError(f"--gpus {args.gpus} is not accepted: expected 'auto' or a number >= 0.") from None
    return args


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from lmtune.sweep.checks import check_address, check_storage
    from lmtune.sweep.load import load_sweep, resolve

    sweep, path = load_sweep(args.sweep_file)
    rs = resolve(sweep, path, smoke=args.smoke, overrides=args.overrides, gpus=args.gpus, cpus=args.cpus)
    check_storage(args.storage)
    check_address(args.address)
    from lmtune.sweep.reuse import check_warm_start
    from lmtune.sweep.searchers import kind_of

    warm = check_warm_start(args.warm_start, rs.searcher, kind_of(rs).warm_starts, args.resume)

    from lmtune.sweep.runner import StoppedEarly, run  # imports ray: only once the input is known to be good

    try:
        outcome = run(rs, address=args.address, storage=args.storage, resume=args.resume,
                      max_concurrent=args.max_concurrent, wandb=not args.no_wandb, render=not args.no_report,
                      dashboard=not args.no_dashboard, rerun=args.rerun, warm_start=warm)
    except StoppedEarly as e:
        print(f"\ninterrupted ({signal.Signals(e.signum).name}) before the sweep's first trial: nothing to continue; "
              f"run the same command again.")
        return 128 + e.signum
    if outcome.interrupted:
        again = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
        by = f" by {signal.Signals(outcome.signal).name}" if outcome.signal else ""
        print(f"\ninterrupted{by}: {len(outcome.rows)} trial(s) recorded, the sweep's state is saved. Continue it "
              f"with:\n  python -m lmtune.sweep {' '.join(shlex.quote(a) for a in again)} --resume")
        return 128 + (outcome.signal or signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM: the shell's convention
    return 0 if outcome.rows else 1


if __name__ == "__main__":
    sys.exit(main())
