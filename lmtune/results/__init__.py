"""A sweep's results directory: its layout both ways (:mod:`.layout`), read back (:mod:`.read`), summarized
(:mod:`.summary`, :mod:`.frontier`), formatted (:mod:`.format`), plotted (:mod:`.plots`) and uploaded
(:mod:`.storage`). No Ray: everything here works on a directory, a finished sweep's or a running one's.
:mod:`lmtune.reporting` makes its report and console summary of it, :mod:`lmtune.exporting` its locked defaults."""

from lmtune.results.read import Results, load_results

__all__ = ["Results", "load_results"]
