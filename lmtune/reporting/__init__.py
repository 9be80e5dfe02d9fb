"""What a sweep's results are shown as: the report files (:mod:`.render`: the tables, plots and report.html, whose
page is :mod:`.page`) and the sweep's console summary (:mod:`.console`). ``python -m lmtune.report`` is the report's
command; the sweep runner prints the console summary and renders the report when a sweep ends."""

from lmtune.reporting.render import render

__all__ = ["render"]
