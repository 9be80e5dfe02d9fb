"""Shared command-line plumbing: bad input is one message on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Callable

from lmtune.config import ConfigError


def user_errors_exit_2(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a ``main(argv)``: a ConfigError becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None,
                       accepted: str | None = None) -> argparse.Namespace:
    """Every command's arguments: options, config files, ``section.key=value`` overrides and a results directory
    in any order, as people type them (``python -m lmtune.train model.n_layer=2 --no-wandb train.steps=3``: plain
    ``parse_args`` takes a positional list in one piece, so the overrides after an option were "unrecognized").

    argparse's own errors (an unknown or abbreviated option, a missing value) become one ``ConfigError`` line that
    names what the command accepts, exit 2 through :func:`user_errors_exit_2`, instead of its usage block.
    ``accepted``: what the positionals are, in words (default: their metavars)."""
    parser.allow_abbrev = False  # `--no-w` is not quietly --no-wandb: a mistyped option is named as such
    options = ", ".join(a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help")
    if accepted is None:
        accepted = ", ".join(a.metavar or a.dest for a in parser._actions if not a.option_strings)
    what = " and ".join(filter(None, [accepted, options and f"the options {options}"]))

    def error(message: str):
        raise ConfigError(f"{message}; accepted: {what} ({parser.prog} --help).")

    parser.error = error  # type: ignore[method-assign]
    return parser.parse_intermixed_args(argv)


def check_output_dir(path: str | os.PathLike, option: str) -> None:
    """``option`` names a directory lmtune writes into: it exists or can be created (no file in its place or
    above it, writable where it would be made). ConfigError otherwise, before any work starts."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {path}: {p} is a file; expected a directory (it is created if missing).")
    _check_parents(p, path, option, "a directory (it is created if missing)")


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """``option`` names a file lmtune writes: not a directory, and its directory exists or can be made."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{option} {path}: {p} is a directory; expected a file path (e.g. {p / 'locked.toml'}).")
    _check_parents(p.parent, path, option, "a file path whose directory exists or can be created")


def _check_parents(p: Path, given: str | os.PathLike, option: str, expected: str) -> None:
    existing = next((q for q in (p, *p.parents) if q.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{option} {given}: {existing} is a file, so no directory can be made below it; "
                          f"expected {expected}.")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {given}: {existing} is not writable; expected {expected} lmtune can write to.")
