"""`report`: turn the results registry into tables, plots, a guideline and one HTML page.

    from medfm.report import report
    files = report(workdir="medfm-work", dataset=["breastmnist", "pneumoniamnist"])
    print(files.html)

    medfm report --out medfm-work/report --dataset breastmnist

Reads only the registry (filters as `Registry.to_dataframe`), including its per-sample scores
(reliability diagrams) and corrupted-split evaluations (robustness). Writes under `out`:
`tables/{per_dataset,mean_over_datasets}_{acc,auc}.{md,tex}`, `tables/calibration_{ece,brier,nll}`,
`tables/robustness_{be,rbe,auc_drop}.{md,tex}` (when corrupted evaluations exist),
`tables/summary.csv` (one row per condition and variant, with calibration and mean corrupted BE),
`tables/mean_over_datasets.csv`, `tables/robustness.csv` (per corruption and severity) and
`tables/robustness_relative.csv` (nBE, rBE per corruption), `plots/*.png` (incl.
`reliability_<dataset>_<size>.png`), `guideline.md`, `report.md` (everything, images linked)
and `report.html` (everything, interactive and self-contained: medfm.report.html).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfm.errors import InvalidArgumentError, MedfmError, RegistryError
from medfm.metrics import ece, reliability_bins
from medfm.report import plots as plotting
from medfm.report import robustness
from medfm.report.cost import cost_section
from medfm.report.leaderboard import build_leaderboard, test_line
from medfm.report.guideline import (
    build_guideline,
    guideline_markdown,
    guideline_sentences_html,
    guideline_table,
)
from medfm.report.html import write_html
from medfm.report.labels import variant_labels
from medfm.report.tables import (
    CALIBRATION_METRICS,
    FINETUNE,
    METRICS,
    annotate,
    calibration_table,
    is_probe,
    mean_over_datasets,
    mean_table,
    per_dataset_table,
    summarize,
)
from medfm.store.blobs import stored_task
from medfm.store.registry import Registry

REPORT_DIRNAME = "report"  # default output folder inside the work directory
GUIDELINE_METRIC = "auc"  # threshold-free, and meaningful for ChestMNIST (its ACC is not)
TITLE = "medfm benchmark report"
NO_CORRUPTIONS = ("No corrupted evaluations in the registry: robustness not measured (run "
                  "`medfm extract ... --corruptions medmnist-c`, then `medfm probe` again).")
LEADERBOARD_NOTE = ("Each block ranks the variants on every dataset they have results on "
                    "(1 = best) and averages the ranks; the Friedman test asks whether any "
                    "variant differs, "
                    "and variants joined by a bar in a critical-difference diagram are not "
                    "separated by the post-hoc test (README, Leaderboard).")
NO_CALIBRATION = ("No calibration stored for these runs (rows saved without per-sample scores); "
                  "calibration tables left out.")


def _check_out(out_dir: Path) -> None:
    """`out_dir` and every folder above it is a folder or absent: never overwrite a file."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise InvalidArgumentError(
                    f"report folder {out_dir} cannot be made: {path} is a file; pass --out a "
                    f"folder (created if missing)")
            return


@dataclass(frozen=True)
class ReportFiles:
    """Everything `report` wrote."""

    out: Path  # the output folder
    html: Path  # report.html, self-contained
    markdown: tuple[Path, ...]  # report.md, guideline.md and one .md per table
    latex: tuple[Path, ...]  # one .tex per table
    csv: tuple[Path, ...]  # summary.csv, mean_over_datasets.csv
    plots: tuple[Path, ...]  # PNG figures
    guideline: Path  # guideline.md
    n_runs: int  # registry rows the report covers


def report(
    *,
    out: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    metric: str = GUIDELINE_METRIC,
    leaderboard: str | None = None,
    **filters: Any,
) -> ReportFiles:
    """Write the report of every registry row matching `filters` into `out`.

    `out` defaults to <workdir>/report; `metric` ("acc" or "auc") ranks the guideline.
    `leaderboard` is an HTML fragment that report.html shows as its Leaderboard section, after
    the guideline (the hook for issue 29's `medfm leaderboard`); None leaves the section out.
    Raises RegistryError when no run matches (run `medfm probe`/`finetune`/`grid` first).
    """
    if metric not in METRICS:
        raise RegistryError(f"guideline metric {metric!r} is not one of {', '.join(METRICS)}")
    registry = Registry.existing(workdir)
    out_dir = Path(out).expanduser() if out is not None else registry.path.parent / REPORT_DIRNAME
    _check_out(out_dir)
    everything = registry.to_dataframe(corruptions=True, **filters)
    frame = everything[everything["corruption"].isna()].reset_index(drop=True)
    corrupted = everything[everything["corruption"].notna()].reset_index(drop=True)
    if frame.empty:
        where = f" matching {filters}" if filters else ""
        raise RegistryError(
            f"no results{where} in {registry.path}; run `medfm probe` or `medfm finetune` "
            "(or `medfm grid SPEC.yaml`) first, or loosen the filters"
        )
    table_dir, plot_dir = out_dir / "tables", out_dir / "plots"
    try:
        table_dir.mkdir(parents=True, exist_ok=True)
        plot_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise InvalidArgumentError(f"cannot write the report into {out_dir} ({exc.strerror}: "
                                   f"{exc.filename}); move that file or pass --out another "
                                   f"folder") from None

    annotated = annotate(frame)
    summary = summarize(annotated)
    robust_notes, robust_tables = [NO_CORRUPTIONS], []
    csv = [table_dir / "summary.csv", table_dir / "mean_over_datasets.csv"]
    if not corrupted.empty:
        runs = robustness.corrupted_runs(annotated, corrupted)
        severities = robustness.severity_summary(runs)
        relative = robustness.relative_errors(runs)
        robust_notes = [robustness.__doc__.split("Method. ", 1)[1].strip().replace("\n", " ")]
        robust_tables = [robustness.be_table(severities, summary), robustness.rbe_table(relative),
                         robustness.auc_drop_table(severities)]
        summary = summary.merge(robustness.mean_be(runs), on=robustness.GROUP, how="left")
        csv += [table_dir / "robustness.csv", table_dir / "robustness_relative.csv"]
        severities.drop(columns="regime_order").to_csv(csv[2], index=False)
        relative.drop(columns="regime_order").to_csv(csv[3], index=False)
    means = mean_over_datasets(summary)
    tables = [mean_table(means, m) for m in METRICS] + [per_dataset_table(summary, m)
                                                        for m in METRICS]
    calibrated = summary["ece_mean"].notna().any()
    sections = [  # (heading, notes, tables) after the accuracy tables
        ("Calibration", [] if calibrated else [NO_CALIBRATION],
         [calibration_table(summary, m) for m in CALIBRATION_METRICS] if calibrated else []),
        ("Robustness (MedMNIST-C)", robust_notes, robust_tables),
        cost_section(registry.path.parent),
    ]
    ranked, diagrams = _leaderboard_section(frame, summary, metric, plot_dir)
    sections.insert(0, ranked)
    markdown, latex = [], []
    for table in [*tables, *(t for _, _, section in sections for t in section)]:
        markdown.append(table_dir / f"{table.name}.md")
        markdown[-1].write_text(table.to_markdown(), encoding="utf-8")
        latex.append(table_dir / f"{table.name}.tex")
        latex[-1].write_text(table.to_latex(), encoding="utf-8")
    summary.drop(columns="regime_order").to_csv(csv[0], index=False)
    means.drop(columns="regime_order", errors="ignore").to_csv(csv[1], index=False)

    figures = [
        *plotting.fraction_curves(summary, plot_dir),
        *plotting.size_curves(summary, plot_dir),
        *plotting.probe_vs_finetune(summary, plot_dir),
        *_reliability_diagrams(registry, annotated, summary, metric, plot_dir),
        *diagrams,
    ]
    entries = build_guideline(summary, metric)
    guideline = out_dir / "guideline.md"
    guideline.write_text(guideline_markdown(entries), encoding="utf-8")

    notes = [f"{len(frame)} runs from {registry.path}" + (f", filtered by {filters}"
                                                           if filters else "")
             + f"; {len(corrupted)} corrupted-split evaluations."]
    combined = out_dir / "report.md"
    md_note = (f"{len(frame)} runs from {_md_code(str(registry.path))}"
               + (f", filtered by {_md_code(str(filters))}" if filters else "")
               + f"; {len(corrupted)} corrupted-split evaluations.")
    combined.write_text(
        f"# {TITLE}\n\n{md_note}\n\n" + guideline_markdown(entries) + "\n"
        + "\n".join(t.to_markdown() for t in tables) + "\n"
        + "".join(f"## {heading}\n\n" + "".join(f"{n}\n\n" for n in section_notes)
                  + "\n".join(t.to_markdown() for t in section_tables) + "\n"
                  for heading, section_notes, section_tables in sections)
        + "\n".join(f"![{p.stem}](plots/{p.name})" for p in figures) + "\n",
        encoding="utf-8",
    )
    page = write_html(out_dir / "report.html", title=TITLE, notes=notes, tables=tables,
                      guideline=(guideline_sentences_html(entries), guideline_table(entries)),
                      plots=figures, summary=summary, labels=variant_labels(annotated),
                      sections=sections, leaderboard=leaderboard)
    return ReportFiles(
        out=out_dir, html=page, markdown=(combined, guideline, *markdown), latex=tuple(latex),
        csv=tuple(csv), plots=tuple(figures), guideline=guideline, n_runs=len(frame),
    )


def _leaderboard_section(frame: pd.DataFrame, summary: pd.DataFrame, metric: str,
                         plot_dir: Path) -> tuple[tuple[str, list[str], list], list[Path]]:
    """The report's leaderboard ((heading, notes, tables), CD diagram PNGs): the tables and
    tests `medfm leaderboard` prints, ranked by the guideline's metric; without the
    leaderboard extra, a note saying how to get it."""
    heading = f"Leaderboard (mean rank by {metric.upper()}, Friedman and Nemenyi tests)"
    try:
        board = build_leaderboard(frame, out=plot_dir, metric=metric, summary=summary)
    except MedfmError as exc:  # scikit-posthocs missing: the rest of the report stands
        return (heading, [str(exc)], []), []
    notes, tables, diagrams = [LEADERBOARD_NOTE], [], []
    for block, table in board.tables():
        tables.append(table)
        notes += [f"{block.title}: {line}" for line in (
            [*([test_line(block.test)] if block.test else []), *block.notes])]
        if block.test is not None and block.test.diagram_png:
            diagrams.append(Path(block.test.diagram_png))
    return (heading, notes, tables), diagrams


def _md_code(text: str) -> str:
    """`text` as one Markdown code span: nothing in it (*, _, [, <, a newline, backticks) is
    read as Markdown or HTML (a work directory may be named anything)."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def _reliability_diagrams(registry: Registry, runs: pd.DataFrame, summary: pd.DataFrame,
                          metric: str, out: Path) -> list[Path]:
    """Per (dataset, size): `reliability_<dataset>_<size>.png` of the best probe and the best
    fine-tune (highest seed mean of `metric`, then the larger regime), their seeds' stored test
    scores pooled. Runs saved without scores are left out; a cell with none has no plot."""
    paths = []
    for (dataset, size), cell in summary.groupby(["dataset", "size"], sort=True):
        curves = []
        for kind, wanted in (("probe", is_probe), (FINETUNE[1], lambda m: m == FINETUNE[0])):
            candidates = cell[cell["method"].map(wanted) & cell[f"{metric}_mean"].notna()]
            if candidates.empty:
                continue
            order = candidates["regime_order"].map(lambda o: o[0] * 1e9 + o[1])
            best = candidates.assign(_order=order).sort_values(
                [f"{metric}_mean", "_order"]).iloc[-1]
            digests = runs.loc[(runs["dataset"] == dataset) & (runs["size"] == size)
                               & (runs["regime"] == best["regime"])
                               & (runs["variant"] == best["variant"]), "digest"]
            pooled = [_stored_scores(registry, d) for d in digests]
            pooled = [p for p in pooled if p is not None]
            if not pooled:
                continue
            y_true = np.concatenate([t for t, _ in pooled])
            y_score = np.concatenate([s for _, s in pooled])
            task = stored_task(dataset, y_true, y_score)
            curves.append((f"{kind}: {best['variant']} @ {best['regime']} ({len(pooled)} "
                           f"seed(s))", reliability_bins(y_true, y_score, task),
                           ece(y_true, y_score, task)))
        if curves:
            paths.append(plotting.reliability_diagram(
                curves, f"{dataset} @ {size} px: reliability (seeds pooled)",
                out / f"reliability_{dataset}_{size}.png"))
    return paths


def _stored_scores(registry: Registry, digest: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(y_true, y_score) of a run, or None when it was saved without them."""
    try:
        return registry.scores(digest)
    except RegistryError:
        return None
