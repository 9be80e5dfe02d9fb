"""Shared command-line plumbing: bad input is one message on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import functools
import sys
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
