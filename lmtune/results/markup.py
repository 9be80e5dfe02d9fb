"""Markdown (the subset lmtune writes) as HTML, and the pieces of a self-contained page: escaped text, embedded PNGs.
The result kinds' report.html sections and the page (:mod:`lmtune.reporting.page`) are made of these."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path


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
            out.append(table_html(block))
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


def table_html(lines: list[str]) -> str:
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
