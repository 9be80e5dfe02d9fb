"""Where config values come from: TOML files, the locked-defaults files and overrides, as layers.

Resolution order (later wins)::

    built-in dataclass defaults
      < shipped locked defaults (lmtune/locked_defaults.toml, the phase-0 study's values)
      < the project's locked defaults (./lmtune.locked.toml, written by `python -m lmtune.export`)
      < an explicit --locked FILE
      < config files given on the command line (in order)
      < section.key=value overrides

then ``model.preset`` (llama: rope, rmsnorm, swiglu, GQA, no bias) sets the model keys that no config file and no
override gave, over the built-in and locked defaults.

:func:`resolve` also says, for every key, the layer its value comes from (what ``--describe`` shows).

This module imports only the standard library.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmtune.config.keys import all_keys, apply, field_of, parse_overrides
from lmtune.config.schema import SECTIONS, Config, ConfigError, validate

SHIPPED_LOCKED = Path(__file__).parent.with_name("locked_defaults.toml")
PROJECT_LOCKED = Path("lmtune.locked.toml")
"""Where `lmtune.export` writes by default and where the trainer looks next (relative to the cwd)."""
LOCKED_ENV = "LMTUNE_LOCKED"
"""Environment variable naming a locked-defaults file (same role as --locked)."""


def flatten_toml(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """TOML ``[section] key = value`` → flat keys. A ``[provenance]`` table is metadata and skipped."""
    flat: dict[str, Any] = {}
    for section, table in doc.items():
        if section in ("provenance", "meta"):
            continue
        if section not in SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"{source}: unknown section [{section}]; sections are {', '.join(SECTIONS)}.")
        for k, v in table.items():
            flat[f"{section}.{k}"] = v
    for key in flat:
        try:
            field_of(key)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return flat


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        if p.suffix != ".toml":
            raise ConfigError(f"'{p}' is neither a config file (FILE.toml) nor an override (section.key=value).")
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e}).") from None


def locked_files(explicit: str | Path | None = None) -> list[Path]:
    """The locked-defaults files in force, lowest priority first."""
    files = [SHIPPED_LOCKED]
    if PROJECT_LOCKED.is_file():
        files.append(PROJECT_LOCKED.resolve())
    named = explicit or os.environ.get(LOCKED_ENV)
    if named:
        p = Path(named)
        if not p.is_file():
            raise ConfigError(f"locked-defaults file not found: {p}")
        files.append(p.resolve())
    return files


@dataclass
class Layer:
    """One source of config values, lowest priority first in :func:`layers`."""

    name: str
    """Where the values come from, as --describe shows it: ``locked lmtune/locked_defaults.toml``, ``file x.toml``,
    ``command line``."""
    values: dict[str, Any]
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    error_prefix: str = ""


def layers(files: list[str | Path] = (), overrides: dict[str, Any] | list[str] | None = None, *,
           locked: str | Path | None | Literal[False] = None) -> list[Layer]:
    """The locked-defaults files in force, the config files, then the overrides (later wins)."""
    out = []
    for path in [] if locked is False else locked_files(locked):
        doc = read_toml(path)
        out.append(Layer(f"locked {_shown(path)}", flatten_toml(doc, str(path)), doc.get("provenance") or {}, str(path)))
    for path in map(Path, files):
        out.append(Layer(f"file {path}", flatten_toml(read_toml(path), str(path)), error_prefix=str(path)))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    if overrides:
        out.append(Layer("command line", dict(overrides)))
    return out


def _shown(path: Path) -> str:
    """A path relative to the working directory or to lmtune's package when under either."""
    path = Path(path).resolve()
    for root, prefix in ((Path.cwd(), ""), (SHIPPED_LOCKED.parent.parent, "")):
        try:
            return prefix + str(path.relative_to(root))
        except ValueError:
            continue
    return str(path)


def preset_values(cfg: Config) -> dict[str, Any]:
    """The model keys ``model.preset`` sets (those given explicitly win: :func:`resolve`)."""
    if cfg.model.preset == "llama":  # Touvron et al. 2023; Llama 3's 4 query heads per key/value head
        heads = cfg.model.n_head
        return {"model.position": "rope", "model.norm": "rmsnorm", "model.mlp": "swiglu", "model.bias": False,
                "model.n_kv_head": heads // 4 if heads % 4 == 0 else 0}
    return {}


def _explicit(layer: Layer) -> bool:
    """Whether a layer's values were given for this run (a config file, the command line), not defaults."""
    return not layer.name.startswith("locked ")


def resolve(
    files: list[str | Path] = (),
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    locked: str | Path | None | Literal[False] = None,
) -> tuple[Config, dict[str, str]]:
    """The config and, for every key, the layer its value comes from (``built-in`` for the defaults).

    A locked value whose provenance names the ``ac_mode`` it was measured in (``[provenance."train.ac_budget"]
    ac_mode = "budget"``) is applied only to runs in that mode: the compile partitioner's budget 0.75 would
    otherwise checkpoint a quarter of the blocks of every eager run. The layer below it then decides, and
    the source says so.
    """
    stack = layers(files, overrides, locked=locked)
    skipped: dict[tuple[int, str], str] = {}
    while True:
        cfg, sources = Config(), {k: "built-in" for k in all_keys()}
        explicit: set[str] = set()
        for i, layer in enumerate(stack):
            updates = {k: v for k, v in layer.values.items() if (i, k) not in skipped}
            cfg = apply(cfg, updates, layer.error_prefix)
            sources.update({k: layer.name for k in updates})
            explicit |= set(updates) if _explicit(layer) else set()
        preset = {k: v for k, v in preset_values(cfg).items() if k not in explicit}
        cfg = apply(cfg, preset)
        sources.update({k: f"preset {cfg.model.preset}" for k in preset})
        mismatched = None
        for i, layer in enumerate(stack):
            for key, record in layer.provenance.items():
                mode = record.get("ac_mode") if isinstance(record, dict) else None
                if (key in layer.values and (i, key) not in skipped and sources.get(key) == layer.name
                        and mode and mode != cfg.train.ac_mode):
                    mismatched = (i, key, mode)
        if mismatched is None:
            break
        i, key, mode = mismatched
        skipped[(i, key)] = (f"the {stack[i].name} value {stack[i].values[key]!r} was measured with ac_mode={mode}, "
                             f"not applied to this {cfg.train.ac_mode}-mode run")
    for (i, key), why in skipped.items():
        sources[key] = f"{sources[key]} ({why})"
    validate(cfg)
    return cfg, sources


def load(
    files: list[str | Path] = (),
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    locked: str | Path | None | Literal[False] = None,
) -> Config:
    """Resolve a config: defaults < locked defaults < files < overrides, then validate.

    ``locked=False`` skips every locked-defaults file (the bare dataclass defaults).
    """
    return resolve(files, overrides, locked=locked)[0]


def provenance(path: str | Path) -> dict[str, dict[str, Any]]:
    """The ``[provenance."section.key"]`` records of a locked-defaults file."""
    return read_toml(path).get("provenance", {})
