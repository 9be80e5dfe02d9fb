"""A sweep's results directory: its layout both ways (:mod:`.layout`), read back (:mod:`.read`), read by each kind of
result it holds (:mod:`.kinds`: one module per kind, with its tables, plots and report.html section), formatted
(:mod:`.format`, :mod:`.figures`, :mod:`.markup`) and uploaded (:mod:`.storage`); scaling-law fits (:mod:`.scaling`).
No Ray: everything here works on a directory, a finished sweep's or a running one's. :mod:`lmtune.reporting` gathers
the kinds into the report and the console summary, :mod:`lmtune.exporting` makes locked defaults of a winner."""

from lmtune.results.read import Results, load_results

__all__ = ["Results", "load_results"]
