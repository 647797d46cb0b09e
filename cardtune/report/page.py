"""One self-contained HTML page: inline CSS, inline SVG, no script, no external asset."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c8cdd8}
nav{padding:8px 24px;background:#e9ecf1}nav a{margin-right:14px;color:#2452a6;text-decoration:none}
main{padding:8px 24px 40px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:12px 18px;margin:16px 0}
section h2{margin:4px 0 10px;font-size:17px}h3{font-size:14px;margin:10px 0 4px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #dde1e8;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;word-break:break-word;margin:4px 0}
pre.code{background:#f6f7f9;padding:8px;max-height:420px;overflow:auto;font-size:12px}
pre.tokens{font:12px/1.6 ui-monospace,Menlo,Consolas,monospace;background:#fbfbfc;padding:8px;border:1px solid #eceef2}
.t{background:#b7ebc0;color:#0c3d17;border-right:1px solid #8fd39c}.m{color:#8a91a0}
.md{background:#f1d9f5;color:#6d1f7d;font-weight:600;padding:0 2px}
.note{color:#5b6272;font-size:13px}.bad{color:#b3261e}.good{color:#1e7b34}
.thumbs{display:flex;gap:6px;margin:4px 0}img.thumb{border:1px solid #ccd;border-radius:3px;max-width:96px;
max-height:96px}
svg.chart{display:block;margin:8px 0;max-width:100%;height:auto;background:#fff}
svg .ct{font:600 13px system-ui,sans-serif;fill:#1d2330}svg .tk,svg .lg{font:11px system-ui,sans-serif;fill:#5b6272}
svg .cn{font:12px system-ui,sans-serif;fill:#8a91a0}svg .grid{stroke:#eceef2}svg .frame{fill:none;stroke:#ccd2dc}
.grid2{display:flex;flex-wrap:wrap;gap:8px 20px}
td.pred{max-width:360px}td.prompt{max-width:380px;font-size:12px;color:#5b6272;white-space:pre-wrap}
details summary{cursor:pointer;color:#2452a6}
"""


@dataclass
class Section:
    id: str
    title: str
    body: str


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (), *,
          header_row: bool = True) -> str:
    """An HTML table; cells are escaped, except those given as :class:`Raw`."""
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" if header_row else ""
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = cell.html if isinstance(cell, Raw) else escape(fmt(cell))
            cls = ' class="num"' if i in numeric else (f' class="{cell.cls}"' if isinstance(cell, Raw) and cell.cls else "")
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


@dataclass
class Raw:
    """A table cell given as HTML."""

    html: str
    cls: str = ""


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    nav = "".join(f'<a href="#{s.id}">{escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.id}"><h2>{escape(s.title)}</h2>{s.body}</section>' for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body><header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main></body></html>\n")
