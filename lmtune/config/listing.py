"""The ``--describe`` listing: every key with its type and documentation, and the value a run will use.

A field's documentation is the string literal under it in :mod:`lmtune.config.schema`, read back from the
source.

This module imports only the standard library.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect

from lmtune.config.keys import accepted
from lmtune.config.schema import SECTIONS, Config


def describe(cfg: Config | None = None, sources: dict[str, str] | None = None) -> str:
    """Every key with its type and documentation; with ``cfg``, the value a run will use and the layer it comes
    from (built-in, a locked-defaults file, a config file, the command line), else the built-in default."""
    lines = []
    values = (cfg or Config()).flat()
    for section, cls in SECTIONS.items():
        docs = _attribute_docs(cls)
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            where = f"   <- {sources.get(key, 'built-in')}" if sources is not None else ""
            lines.append(f"  {key} = {values[key]!r}   ({accepted(key)}){where}")
            if f.name in docs:
                lines.append("      " + " ".join(docs[f.name].split()))
    return "\n".join(lines)


def _attribute_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            docs[prev.target.id] = node.value.value
    return docs
