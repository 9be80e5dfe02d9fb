"""Locked defaults from a sweep's results (the export command's logic; ``python -m lmtune.export`` is the command):
the winner and what exporting it would write (:mod:`.plan`), the files written and checked (:mod:`.locked`), the
winner trained afresh before it is locked (:mod:`.validate`)."""

from lmtune.exporting.locked import export, to_markdown, write_export
from lmtune.exporting.plan import ExportPlan, Winner, plan_export, winner

__all__ = ["ExportPlan", "Winner", "export", "plan_export", "to_markdown", "winner", "write_export"]
