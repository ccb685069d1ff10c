"""Registry rows -> seed summaries -> tables rendered as Markdown, LaTeX, HTML and CSV.

Method. Rows are grouped by a *condition* (dataset, size, regime: fraction or shots) and a
*variant* (backbone and method, plus whichever other key fields tell otherwise identical runs
apart, e.g. two resize policies of one backbone). Each group's metrics are averaged over seeds
(mean and sample standard deviation, ddof=1, NaN with one seed); bootstrap CI bounds are
averaged over seeds too. Tables show ACC/AUC in % with the best mean of each row in bold.
The mean-over-datasets table (MedMNIST+'s headline) averages the per-dataset seed means, and
fills a cell only when the variant covers every dataset of that row, so means never mix
different sets of datasets.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass

import pandas as pd

from medfm.report.zeroshot import episodic_params
from medfm.resolve.methods import method_specs
from medfm.resolve.recipes import LATER_FIELDS

METRICS = ("acc", "auc")  # metrics tabulated and plotted, as registry columns
CALIBRATION_METRICS = ("ece", "brier", "nll")  # lower is better; tables of their own
SUMMARIZED = (*METRICS, "balanced_acc", *CALIBRATION_METRICS)  # seed-summarized columns
METRIC_LABELS = {"acc": "ACC", "auc": "AUC", "balanced_acc": "balanced accuracy", "ece": "ECE",
                 "brier": "Brier score", "nll": "NLL"}
FINETUNE = ("finetune", "fine-tune", "--")  # method, how reports name it, its line style
LORA = ("lora", "LoRA", ":")  # fine-tuning low-rank adapters (medfm finetune --lora)
# a fine-tune whose backbone was frozen (freeze_backbone): the references' "linear probing",
# shown apart from medfm's logistic probe on cached features (method logreg)
HEAD_PROBE = ("head-probe", "linear probe (head trained through the frozen backbone)", "-.")
# key fields that may tell two otherwise identical runs apart; shown in a variant's label
VARIANT_FIELDS = (
    "data_digest", "weights", "resize_policy", "input_size", "normalize", "feature_kind",
    "selection", "select_metric", "params",
)
CONDITION_FIELDS = ("dataset", "size", "fraction", "shots")  # what a run was evaluated on
DIGEST_SHOWN = 8  # characters of a data digest in a variant label
PERCENT = 100.0  # registry metrics are fractions; tables, plots and guideline show %


@dataclass(frozen=True)
class Table:
    """A rendered-agnostic table: header, rows of cell strings, and which cells are bold."""

    name: str  # file stem, e.g. "per_dataset_acc"
    title: str  # one line saying what the numbers are
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    bold: tuple[tuple[bool, ...], ...]  # same shape as rows

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown, bold as **x**."""
        lines = [f"**{self.title}**", "", _md_row(self.header), _md_row(["---"] * len(self.header))]
        for row in self.marked_rows():
            lines.append(_md_row([f"**{c}**" if b else c for c, b in row]))
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        """A booktabs `table` float, bold as \\textbf{x}."""
        spec = "l" * (len(self.header) - self._n_numeric()) + "r" * self._n_numeric()
        body = [" & ".join(_tex(h) for h in self.header) + r" \\", r"\midrule"]
        for row in self.marked_rows():
            body.append(" & ".join(rf"\textbf{{{_tex(c)}}}" if b else _tex(c) for c, b in row)
                        + r" \\")
        return "\n".join([
            r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(self.title)}}}",
            rf"\label{{tab:{self.name}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule", *body,
            r"\bottomrule", r"\end{tabular}", r"\end{table}",
        ]) + "\n"

    def to_html(self) -> str:
        """An HTML <table> with a caption, bold as <b>x</b>."""
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join(
            "<tr>" + "".join(
                f"<td><b>{html.escape(c)}</b></td>" if b else f"<td>{html.escape(c)}</td>"
                for c, b in row
            ) + "</tr>"
            for row in self.marked_rows()
        )
        return (f"<table><caption>{html.escape(self.title)}</caption><thead><tr>{head}</tr>"
                f"</thead><tbody>{body}</tbody></table>")

    def marked_rows(self) -> list[list[tuple[str, bool]]]:
        """Rows as lists of (cell, bold) pairs."""
        return [list(zip(cells, bold, strict=True))
                for cells, bold in zip(self.rows, self.bold, strict=True)]

    def _n_numeric(self) -> int:
        """Columns right of the row labels (those holding metrics)."""
        return sum(1 for h in self.header if h not in _ROW_LABELS)


_ROW_LABELS = ("dataset", "size", "regime", "datasets", "corruption", "severity", "family")


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    escaped = "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))
    return escaped.replace("±", r"$\pm$").replace("—", "--").replace("·", r"$\cdot$")


def _method(name: str):
    """The declared probe method called `name`, or None (fine-tune, or a method this medfm
    no longer declares)."""
    return method_specs().get(name)


def paradigm(method: str) -> str:
    """How reports name a method: "linear probe", "kNN", "fine-tune", ..."""
    found = _method(method)
    if found is None and method == LORA[0]:
        return LORA[1]
    if found is None and method == HEAD_PROBE[0]:
        return HEAD_PROBE[1]
    return found.paradigm if found else FINETUNE[1] if method == FINETUNE[0] else method


def line_style(method: str) -> str:
    """The matplotlib line style of a method's curves."""
    found = _method(method)
    if found is None and method == LORA[0]:
        return LORA[2]
    if found is None and method == HEAD_PROBE[0]:
        return HEAD_PROBE[2]
    return found.line_style if found else FINETUNE[2] if method == FINETUNE[0] else "-."


def is_probe(method: str) -> bool:
    return _method(method) is not None


def shown_method(method: str, params: str) -> str:
    """The method a report shows for a registry row: a fine-tune with a frozen backbone is a
    head probe (HEAD_PROBE), every other row its recorded method."""
    if method == FINETUNE[0] and json.loads(params).get("freeze_backbone"):
        return HEAD_PROBE[0]
    return method


def regime_label(fraction: float | None, shots: int | None) -> str:
    """"10%" for a fraction, "5-shot" for shots per class, "zero-shot" for neither."""
    if fraction is not None and not _missing(fraction):
        return f"{fraction * PERCENT:g}%"
    return "zero-shot" if _missing(shots) else f"{int(shots)}-shot"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _distinguishing_fields(frame: pd.DataFrame) -> dict[tuple[str, str], list[str]]:
    """Per (backbone, method): the VARIANT_FIELDS with >1 value among runs of one condition+seed."""
    group_cols = ["backbone", "method", *CONDITION_FIELDS, "seed"]
    keyed = frame[group_cols + list(VARIANT_FIELDS)].astype(str)
    out: dict[tuple[str, str], list[str]] = {}
    for (backbone, method), runs in keyed.groupby(["backbone", "method"], sort=False):
        counts = runs.groupby(group_cols[2:], dropna=False)[list(VARIANT_FIELDS)].nunique()
        out[(backbone, method)] = [f for f in VARIANT_FIELDS if (counts[f] > 1).any()]
    return out


def _with_later_fields(params: dict) -> dict:
    """A fine-tune recipe's params with the fields it was keyed without (recipes.LATER_FIELDS)
    at their "as before" value: a `medfm` row from before issue 14 reads `revision=1`."""
    if "name" not in params or "epochs" not in params:  # not a fine-tune recipe
        return params
    return {**LATER_FIELDS, **params}


def _varying_params(frame: pd.DataFrame) -> dict[tuple[str, str], list[str]]:
    """Per (backbone, method): the method settings (`params` JSON keys) that differ across runs."""
    varying = {}
    for group, runs in frame.groupby(["backbone", "method"], sort=False):
        dicts = [_with_later_fields(json.loads(p)) for p in runs["params"].unique()]
        keys = sorted({k for d in dicts for k in d})
        varying[group] = [k for k in keys
                          if len({json.dumps(d.get(k), sort_keys=True) for d in dicts}) > 1]
    return varying


def annotate(frame: pd.DataFrame) -> pd.DataFrame:
    """Registry rows with `variant`, `paradigm`, `regime` and `regime_order` columns added.

    `variant` is "backbone · method" plus `field=value` for each distinguishing field;
    `regime_order` sorts shots before fractions and each by size. A frozen-backbone fine-tune
    shows as method "head-probe" (`shown_method`).
    """
    frame = frame.copy()
    frame["method"] = [shown_method(m, p) for m, p in zip(frame["method"], frame["params"],
                                                          strict=True)]
    frame["params"] = frame["params"].map(episodic_params)  # episodes pool like seeds
    fields = _distinguishing_fields(frame)
    frame["fraction"] = frame["fraction"].astype(object).where(frame["fraction"].notna(), None)
    frame["shots"] = frame["shots"].astype(object).where(frame["shots"].notna(), None)

    varying_params = _varying_params(frame)

    def variant(row) -> str:
        parts = [f"{row.backbone} · {row.method}"]
        for name in fields[(row.backbone, row.method)]:
            value = getattr(row, name)
            if name == "params":  # only the settings that differ, e.g. "epochs=3"
                params = _with_later_fields(json.loads(value))
                keys = varying_params[(row.backbone, row.method)]
                parts += [f"{k}={json.dumps(params.get(k))}" for k in keys]
                continue
            shown = value[:DIGEST_SHOWN] if name == "data_digest" else value
            parts.append(f"{name}={shown}")
        return " ".join(parts)

    frame["variant"] = [variant(row) for row in frame.itertuples()]
    frame["paradigm"] = frame["method"].map(paradigm)
    subsets = list(frame[["fraction", "shots"]].itertuples(index=False, name=None))
    frame["regime"] = [regime_label(f, s) for f, s in subsets]
    frame["regime_order"] = [
        (1, float(f)) if not _missing(f) else (-1, 0.0) if _missing(s) else (0, float(s))
        for f, s in subsets
    ]
    return frame


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (condition, variant): seed mean/std of each metric and mean CI bounds.

    Columns: dataset, size, regime, regime_order, fraction, shots, variant, backbone, method,
    paradigm, n_seeds, and for each of SUMMARIZED (acc, auc, balanced_acc, ece, brier, nll)
    {m}_mean, {m}_std, {m}_ci_low, {m}_ci_high (metrics as fractions; NaN where not stored).
    """
    keys = ["dataset", "size", "regime", "variant"]
    # vectorized per column, not a Python loop per group (a large registry has 10^4 groups);
    # groups in order of first appearance, as drop_duplicates keeps them
    grouped = frame.groupby(keys, sort=False)
    summary = frame.drop_duplicates(keys)[[
        "dataset", "size", "regime", "regime_order", "fraction", "shots", "variant", "backbone",
        "method", "paradigm"]].reset_index(drop=True)
    summary["size"] = summary["size"].astype(int)
    for column in ("fraction", "shots"):  # float with NaN, or None throughout: as built by rows
        summary[column] = pd.Series(summary[column].tolist(), dtype=None)
    summary["n_seeds"] = grouped["seed"].nunique().to_numpy().astype(int)
    for metric in SUMMARIZED:
        summary[f"{metric}_mean"] = grouped[metric].mean().to_numpy()
        summary[f"{metric}_std"] = grouped[metric].std(ddof=1).to_numpy()  # NaN with one seed
        summary[f"{metric}_ci_low"] = grouped[f"{metric}_ci_low"].mean().to_numpy()
        summary[f"{metric}_ci_high"] = grouped[f"{metric}_ci_high"].mean().to_numpy()
    order = summary["regime_order"].map(lambda o: o[0] * 1e9 + o[1])
    return summary.assign(_order=order).sort_values(
        ["dataset", "size", "_order", "variant"]
    ).drop(columns="_order").reset_index(drop=True)


def mean_over_datasets(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (size, regime, variant): the mean over datasets of the seed means.

    A variant gets a value only if it covers every dataset evaluated at that (size, regime).
    Columns: size, regime, regime_order, variant, backbone, method, paradigm, n_datasets,
    {acc,auc}_mean.
    """
    rows = []
    for (size, regime), cell in summary.groupby(["size", "regime"], sort=False):
        datasets = set(cell["dataset"])
        for variant, runs in cell.groupby("variant", sort=False):
            if set(runs["dataset"]) != datasets:
                continue
            first = runs.iloc[0]
            rows.append({
                "size": int(size), "regime": regime, "regime_order": first["regime_order"],
                "variant": variant, "backbone": first["backbone"], "method": first["method"],
                "paradigm": first["paradigm"], "n_datasets": len(datasets),
                **{f"{m}_mean": runs[f"{m}_mean"].mean() for m in METRICS},
            })
    return pd.DataFrame(rows)


def _cell(mean: float, std: float) -> str:
    if _missing(mean):
        return "—"
    if _missing(std):
        return f"{mean * PERCENT:.1f}"
    return f"{mean * PERCENT:.1f} ± {std * PERCENT:.1f}"


def _wide(frame: pd.DataFrame, row_keys: list[str], metric: str, with_std: bool):
    """(variants, [(row labels, {variant: (mean, std)})]) in frame order."""
    variants = sorted(frame["variant"].unique())
    rows = []
    for labels, group in frame.groupby(row_keys, sort=False):
        cells = {
            r.variant: (getattr(r, f"{metric}_mean"),
                        getattr(r, f"{metric}_std") if with_std else math.nan)
            for r in group.itertuples()
        }
        rows.append((labels, cells))
    return variants, rows


def _table(name: str, title: str, row_header: list[str], variants, rows) -> Table:
    out_rows, out_bold = [], []
    for labels, cells in rows:
        means = [cells[v][0] for v in variants if v in cells and not _missing(cells[v][0])]
        best = max(means) if means else math.nan
        values = [_cell(*cells.get(v, (math.nan, math.nan))) for v in variants]
        bold = [v in cells and cells[v][0] == best for v in variants]
        out_rows.append(tuple(str(x) for x in labels) + tuple(values))
        out_bold.append((False,) * len(labels) + tuple(bold))
    return Table(name, title, tuple(row_header) + tuple(variants), tuple(out_rows),
                 tuple(out_bold))


def per_dataset_table(summary: pd.DataFrame, metric: str) -> Table:
    """Rows (dataset, size, regime) x columns variant: seed mean ± std in %, best in bold."""
    variants, rows = _wide(summary, ["dataset", "size", "regime"], metric, with_std=True)
    title = (f"Test {METRIC_LABELS[metric]} (%), mean ± std over seeds; best per row in bold")
    return _table(f"per_dataset_{metric}", title, ["dataset", "size", "regime"], variants, rows)


def mean_table(means: pd.DataFrame, metric: str) -> Table:
    """Rows (size, regime, #datasets) x columns variant: mean over datasets in %, best in bold."""
    frame = means.copy()
    frame["datasets"] = frame["n_datasets"]
    frame = frame.assign(_order=frame["regime_order"].map(lambda o: o[0] * 1e9 + o[1]))
    frame = frame.sort_values(["size", "_order"])
    variants, rows = _wide(frame, ["size", "regime", "datasets"], metric, with_std=False)
    title = (f"Test {METRIC_LABELS[metric]} (%), mean over datasets of seed means "
             "(a variant is shown only where it covers every dataset); best per row in bold")
    return _table(f"mean_over_datasets_{metric}", title, ["size", "regime", "datasets"],
                  variants, rows)


def ranked_table(name: str, title: str, frame: pd.DataFrame, row_keys: list[str], *,
                 value: str, cell, lower_is_better: bool) -> Table:
    """Rows `row_keys` x columns variant from a long frame (one record per row and variant):
    `cell(record)` is the text, `value` the column ranked; the best of each row is bold."""
    variants = sorted(frame["variant"].unique())
    out_rows, out_bold = [], []
    for labels, group in frame.groupby(row_keys, sort=False):
        labels = labels if isinstance(labels, tuple) else (labels,)
        records = {r["variant"]: r for r in group.to_dict("records")}
        values = [records[v][value] for v in variants
                  if v in records and not _missing(records[v][value])]
        best = (min(values) if lower_is_better else max(values)) if values else math.nan
        out_rows.append(tuple(str(x) for x in labels)
                        + tuple(cell(records[v]) if v in records else "—" for v in variants))
        out_bold.append((False,) * len(labels) + tuple(
            v in records and records[v][value] == best for v in variants))
    return Table(name, title, tuple(row_keys) + tuple(variants), tuple(out_rows),
                 tuple(out_bold))


CALIBRATION_UNITS = {"ece": (PERCENT, 1, " (%)"), "brier": (1.0, 3, ""), "nll": (1.0, 3, "")}


def calibration_table(summary: pd.DataFrame, metric: str) -> Table:
    """Rows (dataset, size, regime) x variant: seed mean of ECE, Brier or NLL with the seed mean
    of its bootstrap 95% CI bounds, "mean [low, high]"; lowest per row in bold."""
    scale, digits, unit = CALIBRATION_UNITS[metric]
    frame = summary.assign(_order=summary["regime_order"].map(lambda o: o[0] * 1e9 + o[1]))
    frame = frame.sort_values(["dataset", "size", "_order", "variant"])

    def cell(r) -> str:
        if _missing(r[f"{metric}_mean"]):
            return "—"
        low, high = (r[f"{metric}_ci_{b}"] * scale for b in ("low", "high"))
        return f"{r[f'{metric}_mean'] * scale:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    return ranked_table(
        f"calibration_{metric}", f"Test {METRIC_LABELS[metric]}{unit} (lower is better), mean "
        "over seeds [mean bootstrap 95% CI]; lowest per row in bold", frame,
        ["dataset", "size", "regime"], value=f"{metric}_mean", cell=cell, lower_is_better=True)
