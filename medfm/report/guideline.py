"""A model-selection guideline generated from seed summaries.

Method. Conditions are grouped into cells of (image size, label budget); a budget is a bucket of
training fractions (`FRACTION_BUCKETS`) or "few-shot" for shots-per-class runs. Within a cell,
the candidates (backbone + paradigm variants) are compared on the conditions (dataset, fraction
or shots) that all of them were run on; while no condition is shared, the candidate with the
fewest conditions is dropped. A candidate's score is the mean over those conditions of its seed
mean of the chosen metric. The winner is the top score and the gap is its lead over the
runner-up, in percentage points. The gap *exceeds the seed spread* when it is larger than both
candidates' seed standard deviation (averaged over conditions); the *bootstrap CIs separate*
when the winner's mean lower 95% bound is above the runner-up's mean upper bound. A win that
passes both is called clear; one that passes neither is a tie within noise. Beside the best on
clean data, each cell names the *most robust* candidate, the lowest mean balanced error over the
corrupted test splits (MedMNIST-C; medfm.report.robustness), and the *best calibrated*, the
lowest test ECE, each compared the same way on the conditions all its candidates share, and
says whether one candidate is all three.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass

import pandas as pd

from medfm.report.tables import METRIC_LABELS, PERCENT, Table, paradigm
from medfm.report.zeroshot import spread_zero_shot

# (upper bound inclusive, name): fractions are bucketed by the first bound they do not exceed
FRACTION_BUCKETS = ((0.02, "scarce (≤2%)"), (0.2, "limited (2–20%)"), (1.0, "abundant (>20%)"))
FEW_SHOT = "few-shot"
VERDICTS = {  # (exceeds seed spread, CIs separate) -> words
    (True, True): "clear win",
    (True, False): "consistent over seeds, within test-set CI",
    (False, True): "CIs separate, but within seed spread",
    (False, False): "tie within noise",
}


@dataclass(frozen=True)
class GuidelineEntry:
    """The recommendation for one (size, label budget) cell."""

    size: int  # source image size
    budget: str  # the label budget: one of the FRACTION_BUCKETS names or FEW_SHOT (a table's
    #              `regime` is one training subset, "10%"; a budget groups several)
    metric: str  # "acc" or "auc"
    winner: str  # variant label (backbone · method ...)
    paradigm: str  # linear probe | kNN | fine-tune
    score: float  # winner's mean over shared conditions of seed means, in [0, 1]
    runner_up: str | None  # second-best variant, None when alone
    gap: float  # winner - runner-up, in [0, 1] units (NaN when alone)
    seed_spread: float  # max of the two candidates' mean seed std (NaN with one seed)
    exceeds_spread: bool | None  # gap > seed_spread (None when not measurable)
    ci_separate: bool | None  # winner CI low > runner-up CI high (None when alone)
    n_conditions: int  # shared (dataset, fraction/shots) conditions compared
    datasets: tuple[str, ...]  # datasets among them
    most_robust: str | None = None  # lowest mean BE on corrupted splits (None: none evaluated)
    robust_be: float = math.nan  # its mean balanced error over corrupted splits, in [0, 1]
    best_calibrated: str | None = None  # lowest mean test ECE (None: no ECE stored)
    calibrated_ece: float = math.nan  # its mean ECE, in [0, 1]

    @property
    def agreement(self) -> str:
        """Whether the best on clean data is also the most robust and the best calibrated."""
        named = {"most robust": self.most_robust, "best calibrated": self.best_calibrated}
        known = {k: v for k, v in named.items() if v is not None}
        if not known:
            return "robustness and calibration not measured"
        if all(v == self.winner for v in known.values()):
            return ("the same candidate is best on clean data and "
                    + " and ".join(known))
        differs = [k for k, v in known.items() if v != self.winner]
        return f"not the same: the {' and the '.join(differs)} differs from the best on clean data"

    @property
    def verdict(self) -> str:
        """How much to trust the win, in words."""
        if self.runner_up is None:
            return "only candidate"
        if self.exceeds_spread is None:
            return "CIs separate (one seed)" if self.ci_separate else "one seed, CIs overlap"
        return VERDICTS[(self.exceeds_spread, bool(self.ci_separate))]

    def sentence(self) -> str:
        """One line a reader can act on."""
        name = METRIC_LABELS[self.metric]
        lead = (f"At {self.size} px with {self.budget} labels, use **{self.winner}** "
                f"({self.paradigm}; mean {name} {self.score * PERCENT:.1f}% over "
                f"{self.n_conditions} condition(s) on {', '.join(self.datasets)})")
        if self.runner_up is None:
            return lead + "; it was the only candidate." + self._beyond_accuracy()
        spread = ("n/a" if math.isnan(self.seed_spread)
                  else f"{self.seed_spread * PERCENT:.1f} pp")
        return (f"{lead}: it leads {self.runner_up} by {self.gap * PERCENT:.1f} pp "
                f"(seed spread {spread}) — {self.verdict}.{self._beyond_accuracy()}")

    def _beyond_accuracy(self) -> str:
        """The robustness and calibration clause of the sentence."""
        robust = ("no corrupted evaluations, so robustness is not measured"
                  if self.most_robust is None else
                  f"most robust: **{self.most_robust}** (mean BE "
                  f"{self.robust_be * PERCENT:.1f}% on corrupted splits)")
        calibrated = ("no ECE stored" if self.best_calibrated is None else
                      f"best calibrated: **{self.best_calibrated}** (ECE "
                      f"{self.calibrated_ece * PERCENT:.1f}%)")
        return f" {robust[0].upper()}{robust[1:]}; {calibrated}; {self.agreement}."


def fraction_bucket(fraction: float | None) -> str:
    """The label budget of a training fraction (None: shots-based -> FEW_SHOT)."""
    if fraction is None or (isinstance(fraction, float) and math.isnan(fraction)):
        return FEW_SHOT
    for upper, name in FRACTION_BUCKETS:
        if fraction <= upper:
            return name
    return FRACTION_BUCKETS[-1][1]


def _shared_conditions(cell: pd.DataFrame) -> pd.DataFrame:
    """`cell` restricted to conditions every remaining candidate has (see module docstring)."""
    cell = cell.assign(condition=list(zip(cell["dataset"], cell["regime"], strict=True)))
    while True:
        sets = {v: set(rows["condition"]) for v, rows in cell.groupby("variant")}
        common = set.intersection(*sets.values())
        if common or len(sets) == 1:
            return cell[cell["condition"].isin(common)]
        weakest = min(sets, key=lambda v: (len(sets[v]), v))
        cell = cell[cell["variant"] != weakest]


def _lowest(cell: pd.DataFrame, column: str) -> tuple[str | None, float]:
    """The variant with the lowest mean of `column` over the conditions all candidates with a
    value share, and that mean; (None, NaN) when no candidate has one."""
    cell = cell[cell[column].notna()]
    if cell.empty:
        return None, math.nan
    means = _shared_conditions(cell).groupby("variant")[column].mean().sort_values()
    return str(means.index[0]), float(means.iloc[0])


def build_guideline(summary: pd.DataFrame, metric: str = "auc") -> list[GuidelineEntry]:
    """One GuidelineEntry per (size, label budget) cell, ordered by size then budget.

    `summary` is tables.summarize's, with `ece_mean` and, where corrupted evaluations exist,
    `be_mean` (robustness.mean_be); a summary without them names no robust/calibrated winner.
    """
    summary = spread_zero_shot(summary)  # zero-shot: a flat candidate at every subset size
    frame = summary.assign(bucket=[fraction_bucket(f) for f in summary["fraction"]])
    for optional in ("be_mean", "ece_mean"):
        if optional not in frame:
            frame[optional] = math.nan
    frame = frame[frame[f"{metric}_mean"].notna()]
    order = {name: i for i, name in enumerate([FEW_SHOT, *(n for _, n in FRACTION_BUCKETS)])}
    entries = []
    cells = sorted(frame.groupby(["size", "bucket"]), key=lambda kv: (kv[0][0], order[kv[0][1]]))
    for (size, bucket), cell in cells:
        shared = _shared_conditions(cell)
        scores = shared.groupby("variant").agg(
            score=(f"{metric}_mean", "mean"),
            spread=(f"{metric}_std", "mean"),
            ci_low=(f"{metric}_ci_low", "mean"),
            ci_high=(f"{metric}_ci_high", "mean"),
            method=("method", "first"),
        ).sort_values(["score"], ascending=False)
        best = scores.iloc[0]
        runner = scores.iloc[1] if len(scores) > 1 else None
        gap = spread = math.nan
        exceeds = separate = None
        if runner is not None:
            gap = float(best["score"] - runner["score"])
            spreads = [s for s in (best["spread"], runner["spread"]) if not math.isnan(s)]
            spread = max(spreads) if spreads else math.nan
            exceeds = None if not spreads else bool(gap > spread)
            separate = bool(best["ci_low"] > runner["ci_high"])
        most_robust, robust_be = _lowest(cell, "be_mean")
        best_calibrated, calibrated_ece = _lowest(cell, "ece_mean")
        entries.append(GuidelineEntry(
            size=int(size), budget=bucket, metric=metric, winner=str(scores.index[0]),
            paradigm=paradigm(best["method"]), score=float(best["score"]),
            runner_up=None if runner is None else str(scores.index[1]), gap=gap,
            seed_spread=spread, exceeds_spread=exceeds, ci_separate=separate,
            n_conditions=int(shared["condition"].nunique()),
            datasets=tuple(sorted(shared["dataset"].unique())),
            most_robust=most_robust, robust_be=robust_be, best_calibrated=best_calibrated,
            calibrated_ece=calibrated_ece,
        ))
    return entries


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def _same(entry: GuidelineEntry) -> str:
    """yes / no / n/a: one candidate best on clean data, robustness and calibration alike."""
    named = [v for v in (entry.most_robust, entry.best_calibrated) if v is not None]
    return "n/a" if not named else _yes_no(all(v == entry.winner for v in named))


def guideline_table(entries: list[GuidelineEntry]) -> Table:
    """The guideline as a Table (winner cells bold)."""
    header = ("size", "labels", "winner", "paradigm", "score (%)", "runner-up", "gap (pp)",
              "seed spread (pp)", "gap > spread", "CIs separate", "verdict", "most robust",
              "mean BE (%)", "best calibrated", "ECE (%)", "same?")
    rows = []
    for e in entries:
        rows.append((
            str(e.size), e.budget, e.winner, e.paradigm, f"{e.score * PERCENT:.1f}",
            e.runner_up or "—", "—" if math.isnan(e.gap) else f"{e.gap * PERCENT:.1f}",
            "—" if math.isnan(e.seed_spread) else f"{e.seed_spread * PERCENT:.1f}",
            _yes_no(e.exceeds_spread), _yes_no(e.ci_separate), e.verdict,
            e.most_robust or "—",
            "—" if math.isnan(e.robust_be) else f"{e.robust_be * PERCENT:.1f}",
            e.best_calibrated or "—",
            "—" if math.isnan(e.calibrated_ece) else f"{e.calibrated_ece * PERCENT:.1f}",
            _same(e),
        ))
    bold = tuple((False, False, True) + (False,) * (len(header) - 3) for _ in rows)
    metric = METRIC_LABELS[entries[0].metric] if entries else ""
    return Table("guideline", f"Model-selection guideline by test {metric}", header,
                 tuple(rows), bold)


def guideline_markdown(entries: list[GuidelineEntry]) -> str:
    """The guideline as Markdown: method, one sentence per cell, then the table."""
    intro = __doc__.split("Method. ", 1)[1].strip().replace("\n", " ")
    lines = ["# Model-selection guideline", "", intro, ""]
    lines += [f"- {e.sentence()}" for e in entries]
    return "\n".join(lines) + "\n\n" + guideline_table(entries).to_markdown()


def guideline_sentences_html(entries: list[GuidelineEntry]) -> list[str]:
    """Each cell's sentence as an HTML fragment (escaped, **x** as <b>x</b>)."""
    return [re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(e.sentence())) for e in entries]
