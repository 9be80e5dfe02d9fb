"""``report.html``: one self-contained page per sweep (no network, no script): what the experiment is, every table
of the markdown files the report wrote (frontier.md, summary.md), the plots (embedded), each result kind's own
sections (:mod:`lmtune.results.kinds`: every trial's card with its learning curve, per-layer gradient norms, status and
evidence), the sweep's cost in device-hours, and the locked-defaults table an export would write.

:func:`lmtune.reporting.render.render` writes it next to the files it is made from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lmtune.config import ConfigError
from lmtune.exporting import plan_export, to_markdown
from lmtune.results.format import status_label
from lmtune.results.kinds import Kind
from lmtune.results.kinds.trials import cost_text
from lmtune.results.markup import esc, markdown_html, png_data
from lmtune.results.read import Results

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f4f4f6; } td:first-child, th:first-child { text-align: left; }
blockquote { margin: .5em 0; padding: .3em 1em; border-left: 4px solid #4a7bd0; background: #f5f8fd; }
code { background: #f1f1f3; padding: 0 3px; border-radius: 3px; }
pre.description { white-space: pre-wrap; background: #fafafa; border: 1px solid #eee; padding: .8em; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.trials { display: flex; flex-wrap: wrap; gap: 12px; }
.trial { border: 1px solid #ddd; border-radius: 6px; padding: 6px 10px; width: 360px; }
.trial h3 { font-size: 13px; margin: 0 0 4px; } .muted { color: #666; font-size: 12px; }
.status-ok { color: #1a7f37; } .status-oom, .status-host_oom, .status-diverged, .status-error { color: #c0392b; }
.status-pruned { color: #8a6d00; }
"""


def write_html(results: Results, kinds: Sequence[Kind], files: Sequence[Path], path: Path) -> Path:
    path.write_text(page(results, kinds, files))
    return path


def page(results: Results, kinds: Sequence[Kind], files: Sequence[Path]) -> str:
    """The page of ``results`` with the kinds it holds, from the ``files`` the report wrote (.md tables, .png plots)."""
    title = f"{results.name} ({results.group})"
    parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{esc(results.name)}</h1>",
             f"<p class='muted'>Sweep group {esc(results.group)} · results in <code>{esc(str(results.dir))}</code>"
             f" · written by <code>python -m lmtune.report</code></p>"]
    description = str(results.sweep.get("description") or "").strip()
    if description:
        parts += ["<h2>The experiment</h2>", f"<pre class='description'>{esc(description)}</pre>"]
    counts: dict[str, int] = {}
    for r in results.rows:
        counts[status_label(r)] = counts.get(status_label(r), 0) + 1
    spent = cost_text(results)
    parts.append(f"<p><b>{len(results.rows)} trial(s)</b>: " + ", ".join(
        f"{n} {esc(s)}" for s, n in sorted(counts.items())) + (f". {esc(spent)}" if spent else "") + "</p>")
    parts += [markdown_html(p.read_text(), demote=1) for p in files if p.suffix == ".md" and p.is_file()]
    if files:
        parts.append("<h2>Plots</h2>")
        parts += [f"<h3>{esc(p.stem.replace('_', ' '))}</h3><img alt='{esc(p.name)}' src='{png_data(p)}'>"
                  for p in files if p.suffix == ".png" and p.is_file()]
    parts += [section for kind in kinds for section in kind.html(results)]
    parts += ["<h2>Locked defaults an export would write</h2>", export_html(results)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def export_html(results: Results) -> str:
    try:
        plan = plan_export(results)
    except ConfigError as e:
        return f"<p>None: {esc(str(e))}</p>"
    md = to_markdown(plan.values, plan.provenance, plan.path)
    return markdown_html(md, demote=2) + (f"<p class='muted'>Write them with <code>python -m lmtune.export "
                                          f"{esc(str(results.dir))}</code>.</p>")

