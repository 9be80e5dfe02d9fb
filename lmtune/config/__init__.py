"""Typed configuration: one dataclass per section, TOML files, ``section.key=value`` overrides.

- :mod:`lmtune.config.schema`: the sections (every field documented by the string literal under it), the rules
  between fields, :class:`ConfigError`;
- :mod:`lmtune.config.keys`: their ``section.key`` names, coercion of TOML and command-line values, overrides;
- :mod:`lmtune.config.layering`: TOML files, the locked-defaults files (lookup order, provenance), and
  :func:`resolve`/:func:`load`, which lay built-in defaults < locked defaults < config files < overrides;
- :mod:`lmtune.config.listing`: :func:`describe`, the ``--describe`` listing.

Every value is validated before any work starts: a bad key, type or range raises :class:`ConfigError`,
which the command-line entry points turn into one message and exit code 2.

This package imports only the standard library. It hands on the names of its modules (``lmtune.config.load``,
``from lmtune.config import ConfigError``, ...).
"""

from lmtune.config.keys import accepted, all_keys, apply, check_key, coerce, from_flat, parse_overrides
from lmtune.config.layering import (
    LOCKED_ENV,
    PROJECT_LOCKED,
    SHIPPED_LOCKED,
    Layer,
    flatten_toml,
    layers,
    load,
    locked_files,
    provenance,
    read_toml,
    resolve,
)
from lmtune.config.listing import describe
from lmtune.config.schema import (
    SECTIONS,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    SystemConfig,
    TrainConfig,
    validate,
)

__all__ = [
    "LOCKED_ENV", "PROJECT_LOCKED", "SECTIONS", "SHIPPED_LOCKED",
    "Config", "ConfigError", "DataConfig", "Layer", "ModelConfig", "SystemConfig", "TrainConfig",
    "accepted", "all_keys", "apply", "check_key", "coerce", "describe", "flatten_toml", "from_flat", "layers", "load",
    "locked_files", "parse_overrides", "provenance", "read_toml", "resolve", "validate",
]
