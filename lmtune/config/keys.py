"""Flat ``section.key`` names of the configuration: which keys there are, what each accepts, values coerced to a
key's type and range as they are set, updates applied, ``--`` overrides parsed, a Config rebuilt from flat values.

This module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

from lmtune.config.schema import SECTIONS, Config, ConfigError, validate


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def field_of(key: str) -> dataclasses.Field:
    section, name = _split_key(key)
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == name:
            return f
    raise ConfigError(_unknown_key_message(key))


def check_key(key: str) -> None:
    """ConfigError (naming the key, the closest one and the section's keys) unless ``key`` is a config key."""
    field_of(key)


def _split_key(key: str) -> tuple[str, str]:
    section, dot, name = key.partition(".")
    if not dot or section not in SECTIONS or "." in name:
        raise ConfigError(_unknown_key_message(key))
    return section, name


def _unknown_key_message(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.6)
    section = key.partition(".")[0]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    if section in SECTIONS:
        keys = ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))
        return f"unknown config key '{key}'.{hint} Keys of [{section}]: {keys}."
    return f"unknown config key '{key}'.{hint} Keys are section.key with sections {', '.join(SECTIONS)}."


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def accepted(key: str) -> str:
    """Human description of what a key accepts."""
    f = field_of(key)
    tp = _hints(SECTIONS[key.split(".")[0]])[f.name]
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    desc = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp)
    if desc is None:
        desc = "a list of strings"
    bounds = []
    m = f.metadata
    if m.get("ge") is not None:
        bounds.append(f">= {m['ge']}")
    if m.get("gt") is not None:
        bounds.append(f"> {m['gt']}")
    if m.get("le") is not None:
        bounds.append(f"<= {m['le']}")
    return desc + (f" ({', '.join(bounds)})" if bounds else "")


def coerce(key: str, value: Any) -> Any:
    """Convert ``value`` (a TOML value or a command-line string) to the key's type, or raise ConfigError."""
    f = field_of(key)
    tp = _hints(SECTIONS[key.split(".")[0]])[f.name]
    shown = value if isinstance(value, str) else repr(value)
    bad = ConfigError(f"{key}={shown} is not accepted: expected {accepted(key)}.")
    from_cli = isinstance(value, str)
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise bad
        out = value
    elif tp is bool:
        if isinstance(value, bool):
            out = value
        elif from_cli and value.lower() in ("true", "1", "yes", "on"):
            out = True
        elif from_cli and value.lower() in ("false", "0", "no", "off"):
            out = False
        else:
            raise bad
    elif tp is int:
        if isinstance(value, bool):
            raise bad
        try:
            out = int(value) if from_cli else value
        except ValueError:
            raise bad from None
        if not isinstance(out, int):
            raise bad
    elif tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(out):  # nan and ±inf pass every range check below
            raise ConfigError(f"{key}={shown} is not accepted: expected a finite number"
                              f"{accepted(key).removeprefix('a number')}.")
    elif tp is str:
        if not isinstance(value, str):
            raise bad
        out = value
    else:  # list[str]
        if from_cli:
            out = [v for v in value.split(",") if v]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out = list(value)
        else:
            raise bad
    m = f.metadata
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        if (m.get("ge") is not None and out < m["ge"]) or (m.get("gt") is not None and out <= m["gt"]) or (
            m.get("le") is not None and out > m["le"]
        ):
            raise bad
    return out


def apply(cfg: Config, updates: dict[str, Any], source: str = "") -> Config:
    """Return a copy of ``cfg`` with flat ``{"section.key": value}`` updates applied and type-checked."""
    out = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS})
    for key, value in updates.items():
        try:
            v = coerce(key, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None
        section, name = _split_key(key)
        setattr(getattr(out, section), name, v)
    return out


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["train.lr=1e-3", ...]`` → ``{"train.lr": "1e-3"}``; keys are checked, values stay strings."""
    out: dict[str, str] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"cannot read '{arg}': overrides are section.key=value, e.g. train.lr=3e-4.")
        field_of(key.strip())
        out[key.strip()] = value.strip()
    return out


def from_flat(flat: dict[str, Any]) -> Config:
    """Rebuild a Config from :meth:`Config.flat` output (e.g. a summary.json or a Tune trial config)."""
    cfg = apply(Config(), flat)
    validate(cfg)
    return cfg
