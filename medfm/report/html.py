"""One self-contained `report.html`: guideline, tables and plots (PNGs inlined as base64)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from medfm.report.tables import Table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; margin: 0.5em 0; }
"""


def png_data_uri(path: Path) -> str:
    """`path` (a PNG) as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def write_html(path: Path, *, title: str, guideline: str, tables: list[Table],
               plots: list[Path], notes: list[str],
               sections: list[tuple[str, list[str], list[Table]]] = ()) -> Path:
    """Write the page: notes, guideline fragment, every table, each section (heading, notes,
    tables), every plot inline."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    parts += ["<h2>Model-selection guideline</h2>", guideline, "<h2>Tables</h2>"]
    parts += [table.to_html() for table in tables]
    for heading, section_notes, section_tables in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts += [f"<p>{html.escape(note)}</p>" for note in section_notes]
        parts += [table.to_html() for table in section_tables]
    parts.append("<h2>Plots</h2>")
    parts += [
        f'<figure><img alt="{html.escape(p.stem)}" src="{png_data_uri(p)}">'
        f"<figcaption>{html.escape(p.name)}</figcaption></figure>"
        for p in plots
    ]
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path
