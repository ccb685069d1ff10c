"""Zero-shot and episodic runs in reports: zero-shot rows (no training subset) as flat lines
beside the probes, and few-shot episodes summarized like seeds.

- A zero-shot run has neither fraction nor shots: its regime is ZERO_SHOT. Plots draw it as a
  horizontal line across each fraction panel of its (dataset, size), and the guideline compares
  it at every fraction and shot count the other candidates of that (dataset, size) ran at
  (`spread_zero_shot`): "what 0 labels give" beside "what k labels give".
- Episodic runs (medfm.episodes) differ only in their episode number: `episodic_params` drops it
  (and marks the setting `episodes: true`), so a setting's episodes and seeds are one variant and
  its seed columns summarize over all of them.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from medfm.episodes import EPISODE_PARAMS
from medfm.resolve.keys import canonical_json

ZERO_SHOT = "zero-shot"  # the regime of a run with no training subset


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def is_zero_shot(fraction, shots) -> bool:
    return _missing(fraction) and _missing(shots)


def episodic_params(params: str) -> str:
    """A run's params with its episode number replaced by `episodes: true` (others as given)."""
    settings = json.loads(params)
    if "episode" not in settings:
        return params
    kept = {k: v for k, v in settings.items() if k not in EPISODE_PARAMS}
    return canonical_json({**kept, "episodes": True})


def spread_zero_shot(summary: pd.DataFrame) -> pd.DataFrame:
    """`summary` with each zero-shot row copied to every fraction and shot count that other rows
    of its (dataset, size) have (the flat line), and the zero-shot rows themselves dropped."""
    flat = summary.apply(lambda r: is_zero_shot(r["fraction"], r["shots"]), axis=1) \
        if len(summary) else pd.Series(dtype=bool)
    if not flat.any():
        return summary
    zero, trained = summary[flat], summary[~flat]
    subsets = trained[["dataset", "size", "regime", "regime_order", "fraction", "shots"]] \
        .drop_duplicates(["dataset", "size", "regime"])
    spread = zero.drop(columns=["regime", "regime_order", "fraction", "shots"]).merge(
        subsets, on=["dataset", "size"])
    return pd.concat([trained, spread[summary.columns]], ignore_index=True)


def draw_flat_lines(ax, summary: pd.DataFrame, dataset: str, size: int, metric: str, colors,
                    percent: float) -> None:
    """Zero-shot runs of (dataset, size) as horizontal lines on a fraction panel."""
    for row in summary.itertuples():
        if row.dataset == dataset and row.size == size and is_zero_shot(row.fraction,
                                                                          row.shots):
            ax.axhline(getattr(row, f"{metric}_mean") * percent, linestyle="--",
                       color=colors[row.variant], label=f"{row.variant} (no labels)")
