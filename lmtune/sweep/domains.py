"""The axes of a sweep's space: each kind of domain, with everything lmtune asks of it, in one place.

A domain says what values it lists (a grid or a choice) or between which bounds it samples (a range), its largest
value, whether a value lies in it, its ``sweep.json`` form, its Optuna distribution and suggestion, and how a config
key checks it. No other module branches on these classes: a new kind of axis is one class here, with its
constructor for sweep files (``from lmtune.sweep.domains import ...``; the usual ones are also in ``lmtune.sweep``).
No ray; optuna only when a distribution or a suggestion is asked for.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from lmtune import config as config_lib
from lmtune.config import ConfigError


class Domain:
    """One axis of a sweep's space (see the subclasses)."""

    kind: ClassVar[str]
    """Its ``type`` in sweep.json (docs/CONTRACTS.md)."""
    spelled: ClassVar[str]
    """How a sweep file writes one (said when something else stands in the space)."""
    crossed: ClassVar[bool] = False
    """Every value is tried, crossed with the other crossed axes (a grid); otherwise the searcher samples it."""
    made: ClassVar[list[type[Domain]]] = []
    """Every kind of domain, in the order they are defined."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "spelled" in cls.__dict__:
            Domain.made.append(cls)

    def listed(self) -> tuple | None:
        """The values it lists (a grid's, a choice's); None for a range."""
        return None

    def bounds(self) -> tuple[Any, Any] | None:
        """(low, high) of a range; None for a domain that lists its values."""
        return None

    def largest(self) -> Any:
        raise NotImplementedError

    def contains(self, value: Any) -> bool:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def distribution(self) -> Any:
        """Its Optuna distribution."""
        raise NotImplementedError

    def suggest(self, trial: Any, key: str) -> Any:
        """Ask an Optuna trial for ``key``'s value in this domain (a define-by-run space)."""
        raise NotImplementedError

    def checked(self, key: str) -> Domain:
        """This domain with its values as ``key`` takes them; ConfigError (without where) when the key refuses it."""
        raise NotImplementedError


def accepted_domains() -> str:
    """``grid([...]), choice([...]), …  or randint(a, b)``: every kind of domain as a sweep file writes it."""
    spelled = [d.spelled for d in Domain.made]
    return ", ".join(spelled[:-1]) + " or " + spelled[-1]


# --- domains that list their values -----------------------------------------------------------------


@dataclass(frozen=True)
class Listed(Domain):
    values: tuple

    def listed(self) -> tuple:
        return self.values

    def largest(self) -> Any:
        return max(self.values)

    def contains(self, value: Any) -> bool:
        return value is not None and any(type(value) is type(x) and value == x for x in self.values)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "values": list(self.values)}

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(list(self.values))

    def suggest(self, trial: Any, key: str) -> Any:
        return trial.suggest_categorical(key, list(self.values))

    def checked(self, key: str) -> Domain:
        if not self.values:
            raise ConfigError(f"space[{key!r}] has no values.")
        if len(set(map(repr, self.values))) != len(self.values):
            raise ConfigError(f"space[{key!r}] repeats a value: {list(self.values)}.")
        return type(self)(tuple(config_lib.coerce(key, v) for v in self.values))


@dataclass(frozen=True)
class Grid(Listed):
    """Every value is tried (crossed with the other grid axes)."""

    kind: ClassVar[str] = "grid"
    spelled: ClassVar[str] = "grid([...])"
    crossed: ClassVar[bool] = True


@dataclass(frozen=True)
class Choice(Listed):
    """A categorical the searcher samples from."""

    kind: ClassVar[str] = "choice"
    spelled: ClassVar[str] = "choice([...])"


# --- ranges -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range(Domain):
    """Values between ``low`` and ``high`` that the searcher samples."""

    low: Any
    high: Any
    samples: ClassVar[type] = float
    """What it samples: floats, or ints."""

    def bounds(self) -> tuple[Any, Any]:
        return self.low, self.high

    def largest(self) -> Any:
        return self.high

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.samples is int and not isinstance(value, int):
            return False
        return self.low <= value <= self.high

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "low": self.low, "high": self.high}

    def check_low(self, key: str) -> None:
        """A kind's own condition on ``low`` (a log scale's)."""

    def checked(self, key: str) -> Domain:
        if not self.low < self.high and not (self.samples is int and self.low == self.high):
            raise ConfigError(f"space[{key!r}]: low={self.low} must be below high={self.high}.")
        self.check_low(key)
        config_lib.coerce(key, self.low)
        config_lib.coerce(key, self.high)
        if type(config_lib.coerce(key, self.low)) is not self.samples:
            raise ConfigError(self.wrong_type(key))
        return self

    def wrong_type(self, key: str) -> str:
        return (f"space[{key!r}]: {self.kind} samples floats but {key} expects {config_lib.accepted(key)}; use "
                f"randint or grid.")


@dataclass(frozen=True)
class Uniform(Range):
    low: float
    high: float
    kind: ClassVar[str] = "uniform"
    spelled: ClassVar[str] = "uniform(a, b)"
    log: ClassVar[bool] = False

    def distribution(self) -> Any:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.log)

    def suggest(self, trial: Any, key: str) -> Any:
        return trial.suggest_float(key, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class LogUniform(Uniform):
    kind: ClassVar[str] = "loguniform"
    spelled: ClassVar[str] = "loguniform(a, b)"
    log: ClassVar[bool] = True

    def check_low(self, key: str) -> None:
        if self.low <= 0:
            raise ConfigError(f"space[{key!r}]: loguniform needs low > 0 (got {self.low}).")


@dataclass(frozen=True)
class IntRange(Range):
    """Integers in [low, high], optionally on a log scale."""

    low: int
    high: int
    log: bool = False
    kind: ClassVar[str] = "int"
    spelled: ClassVar[str] = "randint(a, b)"
    samples: ClassVar[type] = int

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "log": self.log}

    def check_low(self, key: str) -> None:
        if self.log and self.low < 1:
            raise ConfigError(f"space[{key!r}]: randint(log=True) needs low >= 1 (got {self.low}).")

    def wrong_type(self, key: str) -> str:
        return f"space[{key!r}]: randint samples integers but {key} expects {config_lib.accepted(key)}."

    def distribution(self) -> Any:
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high, log=self.log)

    def suggest(self, trial: Any, key: str) -> Any:
        return trial.suggest_int(key, self.low, self.high, log=self.log)


# --- what sweep files write -------------------------------------------------------------------------


def grid(values: Sequence) -> Grid:
    return Grid(tuple(values))


def choice(values: Sequence) -> Choice:
    return Choice(tuple(values))


def uniform(low: float, high: float) -> Uniform:
    return Uniform(float(low), float(high))


def loguniform(low: float, high: float) -> LogUniform:
    return LogUniform(float(low), float(high))


def randint(low: int, high: int, log: bool = False) -> IntRange:
    return IntRange(int(low), int(high), log)


def cross(axes: Mapping[str, Iterable]) -> list[dict[str, Any]]:
    """Every combination of the axes' values as ``{key: value}``, the first axis varying slowest (``[{}]`` for no
    axis): a grid's points."""
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


__all__ = ["Choice", "Domain", "Grid", "IntRange", "LogUniform", "Uniform", "choice", "cross", "grid", "loguniform",
           "randint", "uniform"]
