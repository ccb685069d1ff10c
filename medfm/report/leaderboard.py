"""Leaderboard: backbones ranked across datasets, with a Friedman test and critical differences.

    medfm leaderboard --workdir W [--metric auc|acc] [--posthoc nemenyi|wilcoxon-holm]
    from medfm.report.leaderboard import leaderboard, leaderboard_section
    board = leaderboard(workdir="medfm-work", dataset=["breastmnist", "pneumoniamnist"])
    board.to_dict()                                   # plain data, with the CD diagram paths

Method (Demsar 2006, "Statistical comparisons of classifiers over multiple data sets"). Registry
rows (read only from the registry) are summarized as the report summarizes them
(medfm.report.tables: a *variant* is a backbone plus whatever key fields tell its runs apart;
each metric is averaged over seeds). A leaderboard *block* is one (paradigm, size, fraction or
shots): the variants in it compete on every dataset they have results on. On each dataset the
variants are ranked by the seed mean of the metric (1 = best, ties share the mean of their
ranks); a variant's mean rank and rank-sum are over the datasets it has results on, and its mean
ACC/AUC is the mean over those datasets of the seed means, with the mean over them of the seed
mean of the bootstrap 95% CI bounds. A variant missing a dataset of its block is listed, after
the variants that cover every dataset, with the datasets it misses. The Friedman test
(scipy.stats.friedmanchisquare) runs on the variants that cover every dataset of the block (at
least 3 of them on at least 2 datasets), ranked again among themselves; the post-hoc test
(scikit-posthocs: Nemenyi after Friedman, or pairwise Wilcoxon
signed-rank with Holm's correction) gives every pair's p-value, and the critical-difference
diagram (scikit-posthocs' `critical_difference_diagram`, PNG and SVG) draws the mean ranks with
a bar joining variants the post-hoc test cannot tell apart at `alpha`. With Nemenyi the critical
difference CD = q_alpha * sqrt(k (k + 1) / (6 N)) (q_alpha: the studentized range at k groups,
infinite degrees of freedom, over sqrt 2) is drawn above the axis.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.errors import InvalidArgumentError, MedfmError
from medfm.report.tables import METRIC_LABELS, PERCENT, Table, annotate, summarize
from medfm.store.registry import matching_rows

LEADERBOARD_METRICS = ("auc", "acc")  # what ranks the variants (higher is better)
POSTHOCS = ("nemenyi", "wilcoxon-holm")  # post-hoc tests after Friedman
ALPHA = 0.05  # default significance level of the post-hoc test and the CD diagram
MIN_TEST_VARIANTS = 3  # Friedman needs at least 3 related samples (scipy)
MIN_TEST_DATASETS = 2  # ... each over at least 2 datasets
FEW_DATASETS = 10  # below this many datasets Friedman's chi-square approximation is rough
DIAGRAM_VARIANTS_MAX = 60  # a CD diagram with more variants is unreadable: it is not drawn
FORMATS = ("table", "csv", "json", "md", "tex")
DIAGRAM_DPI = 150
DIAGRAM_INCHES_PER_VARIANT = 0.28  # CD diagram height grows with the labels it stacks


def _missing_extra() -> MedfmError:
    return MedfmError("the leaderboard's statistics need scikit-posthocs; install the extra: "
                      "pip install 'medfm[leaderboard]'")


@dataclass
class Entry:
    """One variant of a block: its ranks over the datasets it has results on and its means."""

    place: int  # 1 = lowest mean rank in the block
    variant: str  # backbone · method [distinguishing fields] (medfm.report.tables.annotate)
    backbone: str  # canonical timm id
    method: str
    mean_rank: float  # mean over its datasets of its rank there (1 = best)
    rank_sum: float  # sum of those ranks
    n_datasets: int
    missing: list[str]  # datasets of the block it has no result on
    ranks: dict[str, float]  # dataset -> rank among the variants with a result there
    scores: dict[str, float]  # dataset -> seed mean of the ranking metric
    acc_mean: float  # mean over its datasets of the seed mean (fraction, not %)
    acc_ci_low: float  # mean over its datasets of the seed mean bootstrap 95% CI bounds
    acc_ci_high: float
    auc_mean: float
    auc_ci_low: float
    auc_ci_high: float
    in_test: bool  # covers every dataset of the block, so takes part in the Friedman test


@dataclass
class FriedmanTest:
    """The Friedman test over the block's complete table and the post-hoc comparisons."""

    statistic: float  # Friedman chi-square (scipy, tie-corrected)
    p_value: float
    n_datasets: int  # N: rows of the complete table
    variants: list[str]  # k columns, by mean rank
    mean_ranks: dict[str, float]  # variant -> mean rank within the complete table
    posthoc: str  # nemenyi | wilcoxon-holm
    alpha: float
    pairwise_p: dict[str, dict[str, float]]  # variant -> variant -> post-hoc p-value
    critical_difference: float | None  # Nemenyi's CD in ranks (None for Wilcoxon-Holm)
    diagram_png: str | None = None  # CD diagram files (None when not drawn; see block notes)
    diagram_svg: str | None = None


@dataclass
class Block:
    """The leaderboard of one (paradigm, size, fraction or shots)."""

    paradigm: str  # linear probe, kNN, fine-tune, LoRA, ...
    size: int
    regime: str  # "10%" or "5-shot"
    fraction: float | None
    shots: int | None
    metric: str  # what ranks the variants
    datasets: list[str]  # datasets with at least one result in this block
    datasets_asked: list[str]  # the datasets the leaderboard was asked for
    entries: list[Entry]
    test: FriedmanTest | None
    notes: list[str] = field(default_factory=list)  # what a reader must know (missing data ...)

    @property
    def title(self) -> str:
        return (f"{self.paradigm} · {self.size} px · {self.regime} · ranked by "
                f"{METRIC_LABELS[self.metric]} over {len(self.datasets)} dataset(s)")


@dataclass
class Leaderboard:
    """Every block of a leaderboard, in (paradigm, size, regime) order."""

    metric: str
    posthoc: str
    alpha: float
    blocks: list[Block]

    def to_dict(self) -> dict:
        """Plain data (JSON-ready; NaN as None): what `--format json` prints and the report
        embeds."""
        return _json_ready({"metric": self.metric, "posthoc": self.posthoc, "alpha": self.alpha,
                            "blocks": [{"title": b.title, **asdict(b)} for b in self.blocks]})

    def to_frame(self) -> pd.DataFrame:
        """One row per (block, variant): what `--format csv` prints."""
        records = []
        for block in self.blocks:
            for e in block.entries:
                records.append({
                    "paradigm": block.paradigm, "size": block.size, "regime": block.regime,
                    "fraction": block.fraction, "shots": block.shots, "metric": block.metric,
                    "place": e.place, "variant": e.variant, "backbone": e.backbone,
                    "method": e.method, "mean_rank": e.mean_rank, "rank_sum": e.rank_sum,
                    "n_datasets": e.n_datasets, "missing": ";".join(e.missing),
                    **{f"{m}_{s}": getattr(e, f"{m}_{s}")
                       for m in ("acc", "auc") for s in ("mean", "ci_low", "ci_high")},
                    "in_test": e.in_test,
                    "friedman_p": block.test.p_value if block.test else math.nan,
                })
        return pd.DataFrame.from_records(records)

    def tables(self) -> list[tuple[Block, Table]]:
        """Each block as a report Table (Markdown, LaTeX, HTML), best mean rank in bold."""
        header = ("place", "variant", "mean rank", "rank-sum", "datasets",
                  "AUC (%) [CI]", "ACC (%) [CI]", "missing")
        out = []
        for block in self.blocks:
            rows = tuple((str(e.place), e.variant, f"{e.mean_rank:.2f}", f"{e.rank_sum:g}",
                          str(e.n_datasets), _interval(e, "auc"), _interval(e, "acc"),
                          ", ".join(e.missing) or "—") for e in block.entries)
            best = block.entries[0].mean_rank
            bold = tuple((False, False, e.mean_rank == best, *(False,) * 5)
                         for e in block.entries)
            name = f"leaderboard_{_slug(block.paradigm)}_{block.size}_{_slug(block.regime)}"
            out.append((block, Table(name, block.title, header, rows, bold)))
        return out

    def render(self, fmt: str) -> str:
        """The leaderboard as text: table, csv, json, md or tex."""
        if fmt == "json":
            import json

            return json.dumps(self.to_dict(), indent=1)
        if fmt == "csv":
            return self.to_frame().to_csv(index=False)
        parts = []
        for block, table in self.tables():
            lines = [*([test_line(block.test)] if block.test else []), *block.notes]
            if fmt == "md":
                parts.append(table.to_markdown() + "\n" + "".join(f"- {x}\n" for x in lines))
            elif fmt == "tex":
                parts.append(table.to_latex() + "".join(f"% {x}\n" for x in lines))
            else:
                parts.append(_plain(table) + "".join(f"  {x}\n" for x in lines))
        return "\n".join(parts)


def _interval(entry: Entry, metric: str) -> str:
    mean, low, high = (getattr(entry, f"{metric}_{s}") for s in ("mean", "ci_low", "ci_high"))
    if math.isnan(mean):
        return "—"
    return f"{mean * PERCENT:.1f} [{low * PERCENT:.1f}, {high * PERCENT:.1f}]"


def _plain(table: Table) -> str:
    widths = [max(len(h), *(len(r[i]) for r in table.rows)) for i, h in enumerate(table.header)]
    lines = [table.title, "  ".join(h.ljust(w) for h, w in zip(table.header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
              for row in table.rows]
    return "\n".join(lines) + "\n"


def test_line(test: FriedmanTest) -> str:
    line = (f"Friedman chi2 = {test.statistic:.3f}, p = {test.p_value:.3g} over "
            f"{test.n_datasets} datasets x {len(test.variants)} variants; post-hoc "
            f"{test.posthoc} at alpha {test.alpha:g}")
    if test.critical_difference is not None:
        line += f", critical difference {test.critical_difference:.3f} ranks"
    if test.diagram_png:
        line += f"; CD diagram {test.diagram_png} (.svg beside it)"
    return line


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("%", "pct")).strip("-")


def _json_ready(value):
    """NaN -> None, numpy scalars -> Python ones, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_options(metric: str, posthoc: str, alpha: float) -> None:
    """One line for a metric, post-hoc test or alpha the leaderboard does not take."""
    if metric not in LEADERBOARD_METRICS:
        raise InvalidArgumentError(f"metric {metric!r} is not one of "
                                   f"{', '.join(LEADERBOARD_METRICS)}.")
    if posthoc not in POSTHOCS:
        raise InvalidArgumentError(f"post-hoc test {posthoc!r} is not one of "
                                   f"{', '.join(POSTHOCS)}.")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise InvalidArgumentError(f"alpha must be a number strictly between 0 and 1 (e.g. "
                                   f"0.05); got {alpha!r}.")


def leaderboard(*, workdir: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                metric: str = "auc", posthoc: str = "nemenyi", alpha: float = ALPHA,
                diagrams: bool = True, **filters) -> Leaderboard:
    """The leaderboard of a work directory's registry (read only; nothing else is read).

    `filters` are the registry's (dataset=[...], backbone=[...], size=[...], method=[...]); the
    datasets asked for are `dataset` when given, else every dataset among the matching rows.
    CD diagrams go to `out` (default <workdir>/leaderboard); `diagrams=False` draws none.
    """
    check_options(metric, posthoc, alpha)
    registry, frame = matching_rows(workdir, **filters)
    asked = filters.get("dataset")
    asked = [asked] if isinstance(asked, str) else asked
    out = Path(out).expanduser() if out is not None else registry.path.parent / "leaderboard"
    return build_leaderboard(frame, out=out if diagrams else None, metric=metric,
                             posthoc=posthoc, alpha=alpha, datasets_asked=asked)


def leaderboard_section(frame: pd.DataFrame, out: str | os.PathLike | None, *,
                        metric: str = "auc", posthoc: str = "nemenyi",
                        alpha: float = ALPHA) -> dict:
    """A report's leaderboard section from registry rows (Registry.to_dataframe): plain data
    (Leaderboard.to_dict) whose blocks carry their CD diagram paths (PNG and SVG, drawn into
    `out`; None: none drawn)."""
    check_options(metric, posthoc, alpha)
    return build_leaderboard(frame, out=None if out is None else Path(out), metric=metric,
                             posthoc=posthoc, alpha=alpha).to_dict()


def build_leaderboard(frame: pd.DataFrame, *, out: Path | None, metric: str = "auc",
                      posthoc: str = "nemenyi", alpha: float = ALPHA,
                      datasets_asked: list[str] | None = None,
                      summary: pd.DataFrame | None = None) -> Leaderboard:
    """The leaderboard of registry rows (clean rows of Registry.to_dataframe); `summary`: their
    tables.summarize(annotate(...)) when the caller has it already (the report)."""
    if summary is None:
        clean = frame[frame["corruption"].isna()] if "corruption" in frame else frame
        summary = summarize(annotate(clean))
    asked = sorted(datasets_asked or summary["dataset"].unique())
    blocks = []
    keys = ["paradigm", "size", "regime"]
    order = summary.assign(_order=summary["regime_order"].map(lambda o: o[0] * 1e9 + o[1]))
    for (paradigm, size, regime), cell in order.sort_values(["paradigm", "size", "_order"]) \
            .groupby(keys, sort=False):
        blocks.append(_block(cell, paradigm=paradigm, size=int(size), regime=regime,
                             metric=metric, posthoc=posthoc, alpha=alpha, asked=asked, out=out))
    return Leaderboard(metric=metric, posthoc=posthoc, alpha=alpha, blocks=blocks)


def _block(cell: pd.DataFrame, *, paradigm: str, size: int, regime: str, metric: str,
           posthoc: str, alpha: float, asked: list[str], out: Path | None) -> Block:
    """One block: ranks per dataset, entries by mean rank, the test and its notes."""
    scores = cell.pivot(index="dataset", columns="variant", values=f"{metric}_mean")
    scores = scores.dropna(how="all").sort_index()
    datasets = list(scores.index)
    ranks = scores.rank(axis=1, ascending=False, method="average")  # NaN stays NaN
    means = cell.groupby("variant").agg(
        backbone=("backbone", "first"), method=("method", "first"),
        **{f"{m}_{s}": (f"{m}_{s}", "mean")
           for m in ("acc", "auc") for s in ("mean", "ci_low", "ci_high")})
    complete = [v for v in scores.columns if scores[v].notna().all()]
    # variants covering every dataset first (their ranks compare), each part by mean rank
    order = sorted(scores.columns, key=lambda v: (v not in complete, ranks[v].mean(), v))
    entries = []
    for place, variant in enumerate(order, start=1):
        have = ranks[variant].dropna()
        row = means.loc[variant]
        entries.append(Entry(
            place=place, variant=variant, backbone=row["backbone"], method=row["method"],
            mean_rank=float(have.mean()), rank_sum=float(have.sum()), n_datasets=len(have),
            missing=[d for d in datasets if d not in have.index],
            ranks={d: float(r) for d, r in have.items()},
            scores={d: float(scores.at[d, variant]) for d in have.index},
            **{f"{m}_{s}": float(row[f"{m}_{s}"])
               for m in ("acc", "auc") for s in ("mean", "ci_low", "ci_high")},
            in_test=variant in complete))
    first = cell.iloc[0]
    notes = _coverage_notes(datasets, asked, entries)
    test = None
    tested = scores[[e.variant for e in entries if e.in_test]]
    enough = len(complete) >= MIN_TEST_VARIANTS and len(datasets) >= MIN_TEST_DATASETS
    if enough and (tested.nunique(axis=1) == 1).all():
        notes.append("no Friedman test: the variants tie on every dataset (nothing to rank)")
    elif enough:
        test = _friedman(tested, posthoc, alpha)
        if len(datasets) < FEW_DATASETS:
            notes.append(f"{len(datasets)} datasets: Friedman's chi-square approximation is "
                         f"rough below {FEW_DATASETS} (Demsar 2006); read the p-value as a guide")
        name = f"cd_{_slug(paradigm)}_{size}_{_slug(regime)}_{metric}"
        if out is not None and len(test.variants) <= DIAGRAM_VARIANTS_MAX:
            test.diagram_png, test.diagram_svg = _draw_diagram(test, out, name, title=(
                f"{paradigm} · {size} px · {regime} · {METRIC_LABELS[metric]}"))
        elif out is not None:
            notes.append(f"no CD diagram: {len(test.variants)} variants, more than the "
                         f"{DIAGRAM_VARIANTS_MAX} one diagram can show")
    else:
        notes.append(f"no Friedman test: it needs at least {MIN_TEST_VARIANTS} variants with "
                     f"results on every one of at least {MIN_TEST_DATASETS} datasets; this "
                     f"block has {len(complete)} on {len(datasets)}")
    return Block(paradigm=paradigm, size=size, regime=regime,
                 fraction=None if pd.isna(first["fraction"]) else float(first["fraction"]),
                 shots=None if pd.isna(first["shots"]) else int(first["shots"]), metric=metric,
                 datasets=datasets, datasets_asked=asked, entries=entries, test=test,
                 notes=notes)


def _coverage_notes(datasets: list[str], asked: list[str], entries: list[Entry]) -> list[str]:
    """What the block lacks: datasets asked for with no result, variants missing datasets."""
    notes = []
    absent = [d for d in asked if d not in datasets]
    if absent:
        notes.append(f"over {len(datasets)} of the {len(asked)} datasets asked for: no result "
                     f"on {', '.join(absent)}")
    for entry in entries:
        if entry.missing:
            notes.append(f"{entry.variant} has no result on {', '.join(entry.missing)}: its "
                         f"mean rank is over {entry.n_datasets} dataset(s) and it is left out "
                         "of the Friedman test")
    return notes


def _friedman(table: pd.DataFrame, posthoc: str, alpha: float) -> FriedmanTest:
    """Friedman (scipy) and the post-hoc test (scikit-posthocs) on a complete table:
    rows = datasets, columns = variants (already ordered by the block's mean rank)."""
    from scipy.stats import friedmanchisquare, studentized_range

    try:
        import scikit_posthocs as sp
    except ImportError:
        raise _missing_extra() from None
    n, k = table.shape
    statistic, p_value = friedmanchisquare(*(table[c].to_numpy() for c in table.columns))
    variants = list(table.columns)
    if posthoc == "nemenyi":
        pairwise = sp.posthoc_nemenyi_friedman(table.to_numpy())
        critical = float(studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
                         * math.sqrt(k * (k + 1) / (6 * n)))
    else:
        pairwise = sp.posthoc_wilcoxon([table[c].to_numpy() for c in variants],
                                       p_adjust="holm", zero_method="zsplit")
        critical = None
    pairwise.index = pairwise.columns = variants
    ranks = table.rank(axis=1, ascending=False, method="average").mean()
    return FriedmanTest(
        statistic=float(statistic), p_value=float(p_value), n_datasets=n, variants=variants,
        mean_ranks={v: float(ranks[v]) for v in variants}, posthoc=posthoc, alpha=alpha,
        pairwise_p={a: {b: float(pairwise.at[a, b]) for b in variants if b != a}
                    for a in variants},
        critical_difference=critical)


def _draw_diagram(test: FriedmanTest, out: Path, name: str, *, title: str) -> tuple[str, str]:
    """The CD diagram as PNG and SVG in `out`: mean ranks on the axis, a bar joining variants
    the post-hoc test does not separate at alpha, Nemenyi's CD above the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scikit_posthocs as sp
    from matplotlib.transforms import offset_copy

    variants = test.variants
    matrix = pd.DataFrame(1.0, index=variants, columns=variants)
    for a, row in test.pairwise_p.items():
        for b, p in row.items():
            matrix.at[a, b] = 1.0 if math.isnan(p) else p
    height = 1.4 + DIAGRAM_INCHES_PER_VARIANT * math.ceil(len(variants) / 2)
    fig, ax = plt.subplots(figsize=(8.0, height))
    try:
        sp.critical_difference_diagram(pd.Series(test.mean_ranks), matrix, ax=ax,
                                       alpha=test.alpha, label_fmt_left="{label} ({rank:.2f})",
                                       label_fmt_right="({rank:.2f}) {label}")
        ax.set_xlim(1, len(variants))  # the whole rank scale, best (1) on the left
        cd = test.critical_difference
        if cd is not None:  # Nemenyi's CD as a bar from rank 1, above the tick labels
            # x in ranks, y in points above the axis line (clear of the tick labels)
            at = offset_copy(ax.get_xaxis_transform(), fig=fig, y=30, units="points")
            ax.plot([1, 1 + cd], [1, 1], transform=at, color="black", lw=2, clip_on=False)
            above = offset_copy(at, fig=fig, y=3, units="points")
            ax.text(1 + cd / 2, 1, f"CD = {cd:.2f}", transform=above, ha="center",
                    va="bottom", fontsize=9)
        ax.set_title(title, fontsize=10, pad=48 if cd is not None else 16)
        out.mkdir(parents=True, exist_ok=True)
        png, svg = out / f"{name}.png", out / f"{name}.svg"
        fig.savefig(png, dpi=DIAGRAM_DPI, bbox_inches="tight")
        fig.savefig(svg, bbox_inches="tight")
    finally:
        plt.close(fig)
    return str(png), str(svg)
