"""The house rules the code keeps: no module of lmtune imports another's private names (a name shared across modules
is public, spelled without the underscore), and no module outside the device layer calls torch.cuda (tests/
test_device.py) or reaches Ray's and Optuna's private parts outside lmtune/sweep/compat.py (ruff's PLC2701, CI)."""

from __future__ import annotations

import ast

from tests.conftest import REPO


def test_no_lmtune_module_imports_another_modules_private_names():
    offenders = []
    for path in sorted((REPO / "lmtune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmtune"):
                offenders += [f"{path.relative_to(REPO)}: {a.name} from {node.module}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []
