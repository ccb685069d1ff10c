"""PNG figures from seed summaries (matplotlib, Agg backend: no display needed).

- `fraction_curves`: per (dataset, size), ACC and AUC vs training fraction on a log axis, one line
  per variant (colour = variant, line style = method), a band of ± one seed std.
- `size_curves`: per dataset, ACC and AUC vs image size at the largest fraction every variant
  has, for datasets evaluated at two sizes or more.
- `probe_vs_finetune`: for every backbone with both, the best probe's seed mean against the
  fine-tune seed mean on the same conditions, with the diagonal (points above: fine-tuning wins).
- `reliability_diagram`: per (dataset, size), accuracy against mean confidence in the ECE's
  bins (medfm.metrics.reliability_bins) for the best probe and the best fine-tune, the diagonal
  (perfect calibration), and the share of samples per bin below.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after selecting the backend

from medfm.report.tables import (  # noqa: E402
    FINETUNE,
    METRIC_LABELS,
    METRICS,
    PERCENT,
    is_probe,
    line_style,
)
from medfm.report.zeroshot import draw_flat_lines  # noqa: E402

DPI = 110  # PNG resolution
PANEL_SIZE = (4.6, 3.4)  # inches per subplot
BAND_ALPHA = 0.18  # opacity of the seed band


def _colors(names) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {b: cmap(i % cmap.N) for i, b in enumerate(sorted(set(names)))}


def _legend_below(fig, ax) -> None:
    """One legend for the whole figure, under the panels, so long variant names never cover data."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               fontsize="small", ncol=min(2, len(labels)), frameon=False)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _panels(n: int):
    fig, axes = plt.subplots(1, n, figsize=(PANEL_SIZE[0] * n, PANEL_SIZE[1]), squeeze=False)
    return fig, axes[0]


def _line(ax, x, mean, std, *, label: str, color, style: str) -> None:
    x, mean, std = (np.asarray(v, dtype=float) for v in (x, mean, std))
    ax.plot(x, mean * PERCENT, style, marker="o", color=color, label=label)
    spread = np.nan_to_num(std) * PERCENT
    if spread.any():
        ax.fill_between(x, (mean - np.nan_to_num(std)) * PERCENT,
                        (mean + np.nan_to_num(std)) * PERCENT, color=color, alpha=BAND_ALPHA)


def fraction_curves(summary: pd.DataFrame, out: Path) -> list[Path]:
    """One PNG per (dataset, size) with fraction-based runs: `fraction_<dataset>_<size>.png`."""
    by_fraction = summary[summary["fraction"].notna()]
    colors = _colors(summary["variant"])
    paths = []
    for (dataset, size), cell in by_fraction.groupby(["dataset", "size"], sort=True):
        fig, axes = _panels(len(METRICS))
        for ax, metric in zip(axes, METRICS, strict=True):
            for variant, runs in cell.groupby("variant", sort=True):
                runs = runs.sort_values("fraction")
                _line(ax, runs["fraction"], runs[f"{metric}_mean"], runs[f"{metric}_std"],
                      label=variant, color=colors[variant],
                      style=line_style(runs["method"].iloc[0]))
            draw_flat_lines(ax, summary, dataset, size, metric, colors, PERCENT)  # zero-shot
            ax.set_xscale("log")
            ax.set_xlabel("training fraction")
            ax.set_ylabel(f"test {METRIC_LABELS[metric]} (%)")
            ax.set_title(f"{dataset} @ {size} px")
            ax.grid(True, which="both", alpha=0.3)
        _legend_below(fig, axes[0])
        paths.append(_save(fig, out / f"fraction_{dataset}_{size}.png"))
    return paths


def size_curves(summary: pd.DataFrame, out: Path) -> list[Path]:
    """One PNG per dataset seen at >= 2 sizes: `size_<dataset>.png`."""
    by_fraction = summary[summary["fraction"].notna()]
    colors = _colors(summary["variant"])
    paths = []
    for dataset, cell in by_fraction.groupby("dataset", sort=True):
        if cell["size"].nunique() < 2:
            continue
        fig, axes = _panels(len(METRICS))
        for ax, metric in zip(axes, METRICS, strict=True):
            for variant, runs in cell.groupby("variant", sort=True):
                # per size, the largest fraction this variant ran at
                top = runs.loc[runs.groupby("size")["fraction"].idxmax()].sort_values("size")
                _line(ax, top["size"], top[f"{metric}_mean"], top[f"{metric}_std"],
                      label=variant, color=colors[variant],
                      style=line_style(top["method"].iloc[0]))
            sizes = sorted(cell["size"].unique())
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.set_xlabel("image size (px), largest fraction run")
            ax.set_ylabel(f"test {METRIC_LABELS[metric]} (%)")
            ax.set_title(dataset)
            ax.grid(True, alpha=0.3)
        _legend_below(fig, axes[0])
        paths.append(_save(fig, out / f"size_{dataset}.png"))
    return paths


def probe_finetune_pairs(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, condition) with both: the best probe's and the fine-tune's seed means."""
    keys = ["backbone", "dataset", "size", "regime"]
    probes = summary[summary["method"].map(is_probe)]
    tuned = summary[summary["method"] == FINETUNE[0]]
    if probes.empty or tuned.empty:
        return pd.DataFrame()
    best_probe = probes.groupby(keys, as_index=False)[[f"{m}_mean" for m in METRICS]].max()
    best_tuned = tuned.groupby(keys, as_index=False)[[f"{m}_mean" for m in METRICS]].max()
    return best_probe.merge(best_tuned, on=keys, suffixes=("_probe", "_finetune"))


def probe_vs_finetune(summary: pd.DataFrame, out: Path) -> list[Path]:
    """`probe_vs_finetune.png` if any backbone has both paradigms on one condition, else none."""
    pairs = probe_finetune_pairs(summary)
    if pairs.empty:
        return []
    colors = _colors(pairs["backbone"])
    fig, axes = _panels(len(METRICS))
    for ax, metric in zip(axes, METRICS, strict=True):
        x = pairs[f"{metric}_mean_probe"] * PERCENT
        y = pairs[f"{metric}_mean_finetune"] * PERCENT
        for backbone in sorted(pairs["backbone"].unique()):
            mine = pairs["backbone"] == backbone
            ax.scatter(x[mine], y[mine], color=colors[backbone], label=backbone)
        finite = np.concatenate([x.dropna(), y.dropna()])
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, PERCENT)
        pad = max(1.0, 0.05 * (hi - lo))
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", linewidth=0.8)
        ax.set_xlabel(f"best linear probe {METRIC_LABELS[metric]} (%)")
        ax.set_ylabel(f"fine-tune {METRIC_LABELS[metric]} (%)")
        ax.set_title("probe vs fine-tune (above diagonal: fine-tune wins)", fontsize="small")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    return [_save(fig, out / "probe_vs_finetune.png")]


def reliability_diagram(curves: list[tuple[str, object, float]], title: str,
                        path: Path) -> Path:
    """`path`: one reliability diagram. `curves` are (label, metrics.ReliabilityBins, ECE)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(PANEL_SIZE[0], PANEL_SIZE[1] * 1.6),
                                      sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    top.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
    colors = _colors(label for label, _, _ in curves)
    for label, bins, ece in curves:
        filled = bins.count > 0
        top.plot(bins.confidence[filled], bins.accuracy[filled], marker="o",
                 color=colors[label], label=f"{label} (ECE {ece * PERCENT:.1f}%)")
        share = bins.count / max(1, bins.count.sum())
        bottom.stairs(share, bins.edges, color=colors[label])
    top.set_ylabel("accuracy in bin")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(title, fontsize="small")
    top.grid(True, alpha=0.3)
    bottom.set_xlabel("confidence of the predicted class")
    bottom.set_ylabel("share of samples")
    bottom.set_ylim(0, 1)
    bottom.grid(True, alpha=0.3)
    _legend_below(fig, top)
    return _save(fig, path)
