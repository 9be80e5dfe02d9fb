"""``report.html``: one self-contained page per sweep (no network, no script): what the experiment is, every table
of summary.md and frontier.md, the plots (embedded), per-trial learning curves and per-layer gradient norms
(inline SVG), each trial's status with its evidence, the sweep's cost in device-hours, and the locked-defaults
table an export would write.

:func:`lmtune.reporting.render.render` writes it next to the markdown it is made from.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any, Sequence

from lmtune.config import ConfigError
from lmtune.contract import FRONTIER_STEM, SUMMARY_MD, layer_keys
from lmtune.exporting import plan_export, to_markdown
from lmtune.results.format import finite, fmt, short, status_label
from lmtune.results.read import Results
from lmtune.results.summary import cost_text

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


def write_html(results: Results, plots: Sequence[Path], path: Path) -> Path:
    path.write_text(page(results, plots))
    return path


def page(results: Results, plots: Sequence[Path]) -> str:
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
    for name in (f"{FRONTIER_STEM}.md", SUMMARY_MD):
        md = results.dir / name
        if md.is_file():
            parts.append(markdown_html(md.read_text(), demote=1))
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f"<h3>{esc(p.stem.replace('_', ' '))}</h3><img alt='{esc(p.name)}' src='{png_data(p)}'>"
                  for p in plots if p.suffix == ".png" and p.is_file()]
    parts += ["<h2>Every trial</h2>", trials_html(results)]
    parts += ["<h2>Locked defaults an export would write</h2>", export_html(results)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --- parts ------------------------------------------------------------------------------------------


def trials_html(results: Results) -> str:
    cards = []
    for r in results.rows:
        tid = str(r.get("trial_id"))
        status = str(r.get("status") or "running")
        point = ", ".join(f"{short(k)}={fmt(r.get(k), k)}" for k in results.space_keys if r.get(k) is not None)
        ms = results.metrics(tid) if r.get("source", "run") == "run" else []
        body = [f"<div class='trial'><h3>{esc(tid)} <span class='status-{esc(status)}'>{esc(status_label(r))}"
                f"</span></h3><div class='muted'>{esc(point)}</div>", f"<div class='muted'>{esc(evidence(r))}</div>"]
        curve = curves_svg(ms)
        body.append(curve or "<div class='muted'>no loss reported</div>")
        norms = layer_norms_svg(ms)
        if norms:
            body.append(norms)
        body.append("</div>")
        cards.append("".join(body))
    return "<div class='trials'>" + "\n".join(cards) + "</div>" if cards else "<p>No trials yet.</p>"


def evidence(row: dict[str, Any]) -> str:
    """Why a trial has its status: for an OOM, whether it ran, was implied by a smaller OOM, or was predicted."""
    status, source = row.get("status"), row.get("source") or "run"
    extra = []
    if status == "oom":
        extra.append({"run": "ran out of memory", "implied": "implied by an OOM at a smaller micro-batch (never ran)",
                      "predicted": "predicted above the limit + margin (never ran)"}.get(source, source))
        if row.get("predicted_peak_gib") is not None:
            extra.append(f"predicted peak {fmt(row['predicted_peak_gib'], 'peak_reserved_gib')} GiB")
    if row.get("error"):
        extra.append(str(row["error"])[:160])
    for key in ("val_loss", "tokens_per_s", "peak_reserved_gib", "device_hours"):
        if row.get(key) is not None:
            extra.append(f"{key} {fmt(row[key], key)}")
    if row.get("node_id"):
        extra.append(f"ran on node {row.get('node_ip') or ''} {str(row['node_id'])[:8]}".replace("  ", " "))
    return "; ".join(extra)


def export_html(results: Results) -> str:
    try:
        plan = plan_export(results)
    except ConfigError as e:
        return f"<p>None: {esc(str(e))}</p>"
    md = to_markdown(plan.values, plan.provenance, plan.path)
    return markdown_html(md, demote=2) + (f"<p class='muted'>Write them with <code>python -m lmtune.export "
                                          f"{esc(str(results.dir))}</code>.</p>")


def curves_svg(metrics: list[dict[str, Any]], width: int = 340, height: int = 150) -> str | None:
    """Train loss (line) and val_loss (dots) against tokens."""
    train = [(m["tokens"], m["loss"]) for m in metrics if finite(m.get("tokens")) and finite(m.get("loss"))]
    val = [(m["tokens"], m["val_loss"]) for m in metrics if finite(m.get("tokens")) and finite(m.get("val_loss"))]
    pts = train + val
    if not pts:
        return None
    pad = 30
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)

    def xy(p):
        return (pad + (p[0] - x0) / (x1 - x0) * (width - pad - 8), 8 + (y1 - p[1]) / (y1 - y0) * (height - 8 - pad))

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='loss against tokens'>",
           f"<rect x='{pad}' y='8' width='{width - pad - 8}' height='{height - 8 - pad}' fill='#fbfbfd' stroke='#ccc'/>"]
    if len(train) > 1:
        out.append("<polyline fill='none' stroke='#4a7bd0' stroke-width='1.5' points='"
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in map(xy, train)) + "'/>")
    out += [f"<circle cx='{a:.1f}' cy='{b:.1f}' r='2.5' fill='#e67e22'/>" for a, b in map(xy, val)]
    out += [f"<text x='{pad}' y='{height - 14}' font-size='10'>{fmt(x0, 'tokens')}</text>",
            f"<text x='{width - 8}' y='{height - 14}' font-size='10' text-anchor='end'>{fmt(x1, 'tokens')} tokens</text>",
            f"<text x='2' y='16' font-size='10'>{y1:.3g}</text>",
            f"<text x='2' y='{height - pad}' font-size='10'>{y0:.3g}</text>",
            f"<text x='{width / 2:.0f}' y='{height - 2}' font-size='10' text-anchor='middle'>"
            "line: loss · dots: val_loss</text></svg>"]
    return "".join(out)


def layer_norms_svg(metrics: list[dict[str, Any]], width: int = 340, height: int = 70) -> str | None:
    """The last reported per-layer gradient norms, log10, one bar per layer."""
    last = next((m for m in reversed(metrics) if layer_keys(m)), None)
    if last is None:
        return None
    keys = layer_keys(last)
    logs = [math.log10(last[k]) if finite(last[k]) and last[k] > 0 else None for k in keys]
    shown = [v for v in logs if v is not None]
    if not shown:
        return None
    lo, hi = min(shown + [0.0]), max(shown + [0.0])
    span = (hi - lo) or 1.0
    bar = (width - 10) / len(keys)
    base = 8 + (hi - 0.0) / span * (height - 24)  # the log10 = 0 line
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='gradient norm per layer'>"]
    for i, v in enumerate(logs):
        if v is None:
            continue
        y = 8 + (hi - v) / span * (height - 24)
        top, h = min(y, base), abs(base - y) or 1
        out.append(f"<rect x='{5 + i * bar:.1f}' y='{top:.1f}' width='{max(bar - 2, 1):.1f}' height='{h:.1f}' "
                   f"fill='#6c5ce7'><title>layer {i}: log10 grad norm {v:.2f}</title></rect>")
    out.append(f"<text x='5' y='{height - 3}' font-size='10'>log10 gradient norm per layer (last report): "
               f"{min(shown):.2f} … {max(shown):.2f}</text></svg>")
    return "".join(out)


# --- markdown (the subset lmtune writes) and helpers ----------------------------------------------------


def markdown_html(text: str, *, demote: int = 0) -> str:
    """Headings, paragraphs, ``>`` quotes, ``-`` lists and pipe tables, with `code` and **bold** inline."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        if heading:
            level = min(6, len(heading.group(1)) + demote)
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
            i += 1
            continue
        block = []
        kind = "table" if line.lstrip().startswith("|") else "quote" if line.startswith(">") else \
            "list" if line.startswith("- ") else "p"
        while i < len(lines) and lines[i].strip() and not re.match(r"^#{1,6}\s", lines[i]):
            nxt = lines[i]
            this = "table" if nxt.lstrip().startswith("|") else "quote" if nxt.startswith(">") else \
                "list" if nxt.startswith("- ") else ("list" if kind == "list" and nxt.startswith("  ") else "p")
            if this != kind:
                break
            block.append(nxt)
            i += 1
        if kind == "table":
            out.append(_table(block))
        elif kind == "quote":
            out.append("<blockquote>" + markdown_html("\n".join(b[1:].removeprefix(" ") for b in block)) + "</blockquote>")
        elif kind == "list":
            items, current = [], []
            for b in block:
                if b.startswith("- ") and current:
                    items.append(" ".join(current))
                    current = []
                current.append(b[2:] if b.startswith("- ") else b.strip())
            items.append(" ".join(current))
            out.append("<ul>" + "".join(f"<li>{inline(t)}</li>" for t in items) + "</ul>")
        else:
            out.append(f"<p>{inline(' '.join(block))}</p>")
    return "\n".join(out)


def _table(lines: list[str]) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    rows = [r for r in rows if not all(re.fullmatch(r":?-{2,}:?", c) for c in r)]
    if not rows:
        return ""
    head, body = rows[0], rows[1:]
    return ("<table><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
            + "</tbody></table>")


def inline(text: str) -> str:
    out = esc(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def esc(text: str) -> str:
    return html.escape(text, quote=True)


def png_data(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
