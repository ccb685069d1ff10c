"""`report`: turn the results registry into tables, plots, a guideline and one HTML page.

    from medfm.report import report
    files = report(workdir="medfm-work", dataset=["breastmnist", "pneumoniamnist"])
    print(files.html)

    medfm report --out medfm-work/report --dataset breastmnist

Reads only the registry (filters as `Registry.to_dataframe`). Writes under `out`:
`tables/{per_dataset,mean_over_datasets}_{acc,auc}.{md,tex}`, `tables/summary.csv` (one row per
condition and variant) and `tables/mean_over_datasets.csv`, `plots/*.png`, `guideline.md`,
`report.md` (everything, images linked) and `report.html` (everything, images inlined).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfm.errors import InvalidArgumentError, RegistryError
from medfm.paths import resolve_workdir
from medfm.report import plots as plotting
from medfm.report.guideline import build_guideline, guideline_html, guideline_markdown
from medfm.report.html import write_html
from medfm.report.tables import (
    METRICS,
    annotate,
    mean_over_datasets,
    mean_table,
    per_dataset_table,
    summarize,
)
from medfm.store.registry import Registry

REPORT_DIRNAME = "report"  # default output folder inside the work directory
GUIDELINE_METRIC = "auc"  # threshold-free, and meaningful for ChestMNIST (its ACC is not)
TITLE = "medfm benchmark report"


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
    **filters: Any,
) -> ReportFiles:
    """Write the report of every registry row matching `filters` into `out`.

    `out` defaults to <workdir>/report; `metric` ("acc" or "auc") ranks the guideline.
    Raises RegistryError when no run matches (run `medfm probe`/`finetune`/`grid` first).
    """
    if metric not in METRICS:
        raise RegistryError(f"guideline metric {metric!r} is not one of {', '.join(METRICS)}")
    out_dir = Path(out).expanduser() if out is not None else (resolve_workdir(workdir)
                                                             / REPORT_DIRNAME)
    _check_out(out_dir)
    registry = Registry.in_workdir(workdir)
    frame = registry.to_dataframe(**filters)
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

    summary = summarize(annotate(frame))
    means = mean_over_datasets(summary)
    tables = [mean_table(means, m) for m in METRICS] + [per_dataset_table(summary, m)
                                                        for m in METRICS]
    markdown, latex = [], []
    for table in tables:
        markdown.append(table_dir / f"{table.name}.md")
        markdown[-1].write_text(table.to_markdown(), encoding="utf-8")
        latex.append(table_dir / f"{table.name}.tex")
        latex[-1].write_text(table.to_latex(), encoding="utf-8")
    csv = [table_dir / "summary.csv", table_dir / "mean_over_datasets.csv"]
    summary.drop(columns="regime_order").to_csv(csv[0], index=False)
    means.drop(columns="regime_order", errors="ignore").to_csv(csv[1], index=False)

    figures = [
        *plotting.fraction_curves(summary, plot_dir),
        *plotting.size_curves(summary, plot_dir),
        *plotting.probe_vs_finetune(summary, plot_dir),
    ]
    entries = build_guideline(summary, metric)
    guideline = out_dir / "guideline.md"
    guideline.write_text(guideline_markdown(entries), encoding="utf-8")

    notes = [f"{len(frame)} runs from {registry.path}" + (f", filtered by {filters}"
                                                           if filters else "") + "."]
    combined = out_dir / "report.md"
    combined.write_text(
        f"# {TITLE}\n\n{notes[0]}\n\n" + guideline_markdown(entries) + "\n"
        + "\n".join(t.to_markdown() for t in tables) + "\n"
        + "\n".join(f"![{p.stem}](plots/{p.name})" for p in figures) + "\n",
        encoding="utf-8",
    )
    page = write_html(out_dir / "report.html", title=TITLE, guideline=guideline_html(entries),
                      tables=tables, plots=figures, notes=notes)
    return ReportFiles(
        out=out_dir, html=page, markdown=(combined, guideline, *markdown), latex=tuple(latex),
        csv=tuple(csv), plots=tuple(figures), guideline=guideline, n_runs=len(frame),
    )
