"""A sweep's results directory: its layout both ways (:mod:`.layout`), read back (:mod:`.read`), summarized
(:mod:`.summary`, :mod:`.frontier`), formatted (:mod:`.format`), rendered (:mod:`.report`: tables, :mod:`.plots`,
:mod:`.html`), exported as locked defaults (:mod:`.export`), shown on the console (:mod:`.console`) and uploaded
(:mod:`.storage`). No Ray: everything here works on a directory, a finished sweep's or a running one's."""

from lmtune.results.read import Results, load_results

__all__ = ["Results", "load_results"]
