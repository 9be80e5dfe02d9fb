"""Shared command-line plumbing: bad input is one message on stderr and exit code 2, never a traceback."""

from __future__ import annotations

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
