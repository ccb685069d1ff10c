"""One self-contained, interactive `report.html`: filters, sortable tables, Plotly plots.

The page needs no network: Plotly's JavaScript (the `plotly` package's bundled plotly.min.js),
the page's own script and style (report.js, report.css beside this module), the data and the
PNG figures (base64) are all inside the file, so it opens offline and can be e-mailed.

What it holds, top to bottom: the notes; filters (dataset, image size, paradigm, training
fraction or shots, backbone; kept in the address's #fragment) that every table and plot
below follows; the model-selection guideline (computed over every run of the report, so the
filters do not change it); the leaderboard section when one is passed; two Plotly plots
(metric vs training fraction for one dataset and size, metric vs image size for one dataset);
the results table (one row per condition and variant, seed means with their bootstrap CI on
hover, sortable, paged so tens of thousands of rows stay responsive); the mean over the
selected datasets, computed in the page (a variant counts only where it covers every selected
dataset of that size and regime, as in tables.mean_over_datasets); the report's tables as in
tables/*.md (sortable, filtered; a table larger than STATIC_CELLS cells is left to its files);
and the PNG figures (up to INLINE_PNG_BYTES). Variants show a short label
(medfm.report.labels); hovering one shows its full settings.
"""

from __future__ import annotations

import base64
import html
import json
import math
from importlib import resources
from pathlib import Path

import pandas as pd

from medfm.errors import MedfmError
from medfm.report.labels import VariantLabel, short_backbones
from medfm.report.tables import PERCENT, Table

STATIC_CELLS = 60_000  # a static table with more cells is left to its .md/.tex/.csv files
PAGE_ROWS = 100  # results-table rows rendered at once (the rest one page click away)
DIGITS = 5  # decimals of a metric (a fraction) in the page's data: 0.001 pp
SHOWN_METRICS = ("acc", "auc", "balanced_acc", "ece", "be")  # results-table columns, if stored
FILTERS = (  # (field, legend) of the filter boxes, in order
    ("dataset", "Dataset"), ("size", "Image size (px)"), ("paradigm", "Paradigm"),
    ("regime", "Training data"), ("backbone", "Backbone"),
)
ROW_FIELDS = ("dataset", "size", "regime")  # table label columns the filters act on
INLINE_PNG_BYTES = 3_000_000  # PNG figures inlined into the page, at most (base64 adds a third)
INTERACTIVE_PLOTS = ("fraction_", "size_")  # PNGs whose curves the page's Plotly plots draw
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}  # no link out of the page


def png_data_uri(path: Path) -> str:
    """`path` (a PNG) as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _asset(name: str) -> str:
    return resources.files("medfm.report").joinpath(name).read_text(encoding="utf-8")


def _plotly_js() -> str:
    """plotly.js as bundled by the `plotly` package (no CDN)."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise MedfmError("report.html embeds Plotly's JavaScript from the plotly package, "
                         "which is missing: pip install 'plotly>=5' (a dependency of medfm; "
                         "reinstalling medfm brings it)") from None

    return get_plotlyjs()


def _number(value) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or pd.isna(value):
        return None
    return round(float(value), DIGITS)


def _regime_key(order: tuple) -> float:
    """tables.annotate's regime_order as one number: shots first, then fractions."""
    return order[0] * 1e9 + order[1]


def page_data(summary: pd.DataFrame, labels: dict[str, VariantLabel]) -> dict:
    """What the page's script reads: the summary as rows of `columns`, variants by index."""
    variants = sorted(labels)
    index = {v: i for i, v in enumerate(variants)}
    metrics = [m for m in SHOWN_METRICS if f"{m}_mean" in summary]
    values = [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    values += [f"{m}_ci_{b}" for m in ("acc", "auc") for b in ("low", "high")]
    columns = ["dataset", "size", "regime", "order", "fraction", "variant", "n_seeds", *values]
    rows = [
        [r["dataset"], int(r["size"]), r["regime"], _regime_key(r["regime_order"]),
         _number(r["fraction"]), index[r["variant"]], int(r["n_seeds"]),
         *(_number(r.get(c)) for c in values)]
        for r in summary.to_dict("records")
    ]
    return {
        "columns": columns, "rows": rows, "metrics": metrics, "percent": PERCENT,
        "page_rows": PAGE_ROWS,
        "variants": [{"variant": v, "label": labels[v].label, "settings": labels[v].settings,
                      "backbone": labels[v].backbone, "paradigm": labels[v].paradigm}
                     for v in variants],
    }


def _filter_options(summary: pd.DataFrame, labels: dict[str, VariantLabel]):
    """(field, legend, [(value, shown, hover)]) per FILTERS entry."""
    regimes = (summary.drop_duplicates("regime")
               .assign(_o=lambda f: f["regime_order"].map(_regime_key)).sort_values("_o"))
    backbones = short_backbones(v.backbone for v in labels.values())
    options = {
        "dataset": [(d, d, d) for d in sorted(summary["dataset"].unique())],
        "size": [(str(s), str(s), f"{s} px") for s in sorted(summary["size"].unique())],
        "paradigm": [(p, p, p) for p in sorted({v.paradigm for v in labels.values()})],
        "regime": [(r, r, r) for r in regimes["regime"]],
        "backbone": [(b, backbones[b], b) for b in sorted(backbones)],
    }
    return [(field, legend, options[field]) for field, legend in FILTERS]


def _filters_html(summary: pd.DataFrame, labels: dict[str, VariantLabel]) -> str:
    boxes = []
    for field, legend, options in _filter_options(summary, labels):
        items = "".join(
            f'<label title="{html.escape(hover)}"><input type="checkbox" '
            f'value="{html.escape(value)}" checked> {html.escape(shown)}</label>'
            for value, shown, hover in options)
        boxes.append(
            f'<fieldset class="filter" data-field="{field}"><legend>{html.escape(legend)} '
            f'<button type="button" class="all">all</button>'
            f'<button type="button" class="none">none</button></legend>'
            f'<div class="options">{items}</div></fieldset>')
    return (f'<nav id="filters" aria-label="filters">{"".join(boxes)}'
            '<div class="status"><button type="button" id="reset">show everything</button> '
            '<span id="count"></span></div></nav>')


def _variant_span(name: str, labels: dict[str, VariantLabel], inner: str | None = None) -> str:
    """A variant as its short label, its full settings on hover."""
    label = labels.get(name)
    if label is None:
        return inner if inner is not None else html.escape(name)
    shown = inner if inner is not None else html.escape(label.label)
    return (f'<span class="variant" title="{html.escape(label.variant)}&#10;'
            f'{html.escape(label.settings)}">{shown}</span>')


def table_html(table: Table, labels: dict[str, VariantLabel], regimes: set[str]) -> str:
    """A Table as a sortable, filterable <table class="static">: a variant header or cell shows
    its label (full settings on hover); rows carry their dataset/size/regime for the filters."""
    if len(table.rows) * len(table.header) > STATIC_CELLS:
        return (f'<p class="note">{html.escape(table.title)}: {len(table.rows)} rows x '
                f'{len(table.header)} columns, too large for the page; see tables/'
                f'{html.escape(table.name)}.md and .tex (the results table above holds the '
                'same seed means).</p>')
    variants = {v: i for i, v in enumerate(sorted(labels))}
    head = "".join(
        f'<th data-variant="{variants[h]}">{_variant_span(h, labels)}</th>' if h in variants
        else f"<th>{html.escape(h)}</th>" for h in table.header)
    fields = {name: i for i, name in enumerate(table.header) if name in ROW_FIELDS}
    body = []
    for row in table.marked_rows():
        attrs = "".join(
            f' data-{name}="{html.escape(row[i][0])}"' for name, i in fields.items()
            if name != "regime" or row[i][0] in regimes)
        cells = "".join(
            "<td>" + (_variant_span(text, labels) if text in labels else
                      f"<b>{html.escape(text)}</b>" if bold else html.escape(text)) + "</td>"
            for text, bold in row)
        body.append(f"<tr{attrs}>{cells}</tr>")
    return (f'<div class="scroll"><table class="static" id="table-{html.escape(table.name)}">'
            f"<caption>{html.escape(table.title)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _with_labels(text_html: str, labels: dict[str, VariantLabel]) -> str:
    """Escaped prose with every bold variant name (<b>name</b>) shown by its label."""
    for name in sorted(labels, key=len, reverse=True):
        escaped = f"<b>{html.escape(name)}</b>"
        if escaped in text_html:
            text_html = text_html.replace(
                escaped, _variant_span(name, labels, f"<b>{html.escape(labels[name].label)}</b>"))
    return text_html


def _figures_html(plots: list[Path]) -> str:
    """The PNG figures, inlined up to INLINE_PNG_BYTES: those the page draws no interactive plot
    for first (names not starting with INTERACTIVE_PLOTS), then the others; any left over are
    named, to be opened from plots/."""
    ordered = sorted(plots, key=lambda p: p.name.startswith(INTERACTIVE_PLOTS))
    inlined, budget = [], INLINE_PNG_BYTES
    for path in ordered:
        budget -= path.stat().st_size
        if budget < 0:
            break
        inlined.append(path)
    left = [p.name for p in ordered[len(inlined):]]
    figures = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="{png_data_uri(p)}">'
        f"<figcaption>{html.escape(p.name)}</figcaption></figure>" for p in inlined)
    note = ("" if not left else f'<p class="note">{len(left)} more in plots/ (left out to keep '
            f"this file small; the plots above draw the same curves): "
            f"{html.escape(', '.join(left))}</p>")
    return (f'<section id="figures"><h2>Figures (PNG, as in plots/)</h2><details><summary>'
            f"{len(inlined)} of {len(plots)} figure(s)</summary>{figures}</details>{note}"
            "</section>")


def write_html(path: Path, *, title: str, notes: list[str], guideline: tuple[list[str], Table],
               tables: list[Table], plots: list[Path], summary: pd.DataFrame,
               labels: dict[str, VariantLabel],
               sections: list[tuple[str, list[str], list[Table]]] = (),
               leaderboard: str | None = None) -> Path:
    """Write the page (see the module docstring).

    `guideline` is (sentences as HTML, table); `leaderboard` an HTML fragment shown after the
    guideline under its own heading (issue 29's `medfm leaderboard` section), or None.
    """
    regimes = set(summary["regime"])
    sentences, guideline_table = guideline
    parts = [f"<header><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    parts.append("</header>" + _filters_html(summary, labels))
    parts.append(
        '<section id="guideline"><h2>Model-selection guideline</h2><p class="note">Computed over '
        "every run in this report; the filters above hide its rows but do not recompute it.</p>"
        "<ul>" + "".join(f"<li>{_with_labels(s, labels)}</li>" for s in sentences) + "</ul>"
        + table_html(guideline_table, labels, regimes) + "</section>")
    if leaderboard is not None:
        parts.append(f'<section id="leaderboard"><h2>Leaderboard</h2>{leaderboard}</section>')
    parts.append(
        '<section id="plots"><h2>Plots</h2><div class="controls"><label>metric <select '
        'id="plot-metric"><option value="auc">AUC</option><option value="acc">ACC</option>'
        '</select></label> <label>dataset @ size <select id="plot-cell"></select></label> '
        '<label>dataset (by size) <select id="plot-dataset"></select></label></div>'
        '<div class="plots"><div class="plot" id="plot-fraction"></div><div class="plot" '
        'id="plot-size"></div></div></section>')
    parts.append(
        '<section id="results"><h2>Results</h2><p class="note">One row per condition (dataset, '
        "size, training data) and variant: mean ± std over seeds, in %. Click a column to sort; "
        'hover a variant for its full settings.</p><div class="scroll"><table class="data" '
        'id="results-table"></table></div><div class="pager" id="results-pager"></div></section>'
        '<section id="means"><h2>Mean over the selected datasets</h2><p class="note">Per size '
        "and training data, the mean of the seed means over the selected datasets; a variant "
        "is shown only where it covers every one of them.</p><div class=\"scroll\"><table "
        'class="data" id="means-table"></table></div><div class="pager" id="means-pager">'
        "</div></section>")
    parts.append('<section id="tables"><h2>Tables</h2>')
    parts += [table_html(table, labels, regimes) for table in tables]
    parts.append("</section>")
    for heading, section_notes, section_tables in sections:
        parts.append(f"<section><h2>{html.escape(heading)}</h2>")
        parts += [f"<p>{html.escape(note)}</p>" for note in section_notes]
        parts += [table_html(table, labels, regimes) for table in section_tables]
        parts.append("</section>")
    parts.append(_figures_html(plots))
    data = json.dumps({**page_data(summary, labels), "plotly_config": PLOTLY_CONFIG},
                      separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{_asset('report.css')}</style></head><body>{''.join(parts)}"
        f'<script type="application/json" id="medfm-data">{data}</script>'
        f"<script>window.PlotlyConfig = {{MathJaxConfig: 'local'}};</script>"
        f"<script>{_plotly_js()}</script><script>{_asset('report.js')}</script></body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path
