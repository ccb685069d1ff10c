"""Every default a run's identity depends on, and the table of key fields added after the first
release: one place to read them, one place to change them.

    from medfm.resolve.defaults import default_seeds, keyed_later
    default_seeds("probe")          # (0, 1, 2)
    keyed_later(params, "sampler", "first-per-class", scope="run")  # added: not the default

The rule that keeps old work directories working: a setting added after result keys were first
written is keyed only where it differs from the value that meant "as before"
(`LATER_KEY_FIELDS`), so every key written before the setting existed stays the key of the same
run and nothing is recomputed. Every module that builds key params asks `keyed_later` (or
`drop_unchanged` for a whole recipe) instead of writing the rule again. This module imports no
other medfm module: anything may read it.
"""

from __future__ import annotations

import numpy as np

STAGE_SEEDS = {  # seeds a run gets when none are given
    "probe": (0, 1, 2),  # probing is cheap: three subsets per fraction by default
    "finetune": (0,),  # training is not: one
    "grid": (0,),  # a grid spec's `seeds` default (medfm.grid.spec)
}
PROBE_METHOD = "logreg"  # `medfm probe` without --method
RECIPE = "medfm"  # `medfm finetune` without --recipe (medfm.resolve.recipes)
SAMPLER = "shuffled"  # how training subsets are drawn without --sampler (medfm.sampling)
N_BOOTSTRAP = 1000  # resamples per test-metric confidence interval, clean and corrupted alike
CI_LEVEL = 0.95  # confidence level of the percentile intervals
# logreg's C values: 1e-4 .. 1e2, half a decade apart: with standardized ~1k-d features, C * n
# spans strongly regularized few-shot fits (n ~ 10) to nearly unregularized full-split fits
C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 13))
LOGREG_MAX_ITER = 100  # L-BFGS iterations per C (scikit-learn's default)
LOGREG_TOL = 1e-4  # largest absolute gradient component at convergence (scikit-learn's default)
SOLVERS = ("auto", "sklearn", "torch", "batched", "cuml")  # how logreg fits: values of --solver
SAMPLER_PARAM = "sampler"  # a run key's params name a sampler other than SAMPLER here
EPISODE_KEY_FIELDS = ("episode", "ways", "episode_rows")  # what a few-shot episode keys

# (scope, setting) -> the value that means "as before": keyed only where it differs.
# scope "run": a key's params (any method); "knn": kNN's settings; "recipe": a fine-tune recipe.
LATER_KEY_FIELDS: dict[tuple[str, str], object] = {
    ("run", SAMPLER_PARAM): SAMPLER,
    **{("run", name): None for name in EPISODE_KEY_FIELDS},  # no episode: keys as before
    ("knn", "vote"): "fraction",
    **{("recipe", name): value for name, value in {
        "schedule_scope": "all", "lr_backbone_vit": None, "drop_last": False,
        "whole_epochs": False, "eval_rounds": 0, "head_init": "small",
        "frozen_train_mode": False, "revision": 1, "min_steps": 0, "epoch_steps": 0,
        "class_weight": "none",
    }.items()},
}


def default_seeds(stage: str) -> tuple[int, ...]:
    """The seeds `stage` ("probe", "finetune", "grid") runs when none are given."""
    return STAGE_SEEDS[stage]


def later_defaults(scope: str) -> dict[str, object]:
    """Setting -> its "as before" value, for every later-added setting of `scope`."""
    return {name: value for (s, name), value in LATER_KEY_FIELDS.items() if s == scope}


def keyed_later(params: dict, name: str, value: object, *, scope: str = "run") -> dict:
    """`params` with `name: value` added only where `value` is not its "as before" value."""
    if value == LATER_KEY_FIELDS[(scope, name)]:
        return params
    return {**params, name: value}


def drop_unchanged(params: dict, scope: str) -> dict:
    """`params` without the later-added settings of `scope` still at their "as before" value."""
    old = later_defaults(scope)
    return {k: v for k, v in params.items() if not (k in old and v == old[k])}
