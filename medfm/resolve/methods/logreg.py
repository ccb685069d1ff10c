"""`--method logreg`, declared: the settings of a linear probe that enter a result's key, its
selection rules and options. The probe itself (standardization, the C grid walk or batched
solve, selection) is medfm.probe.methods.logreg.
"""

from __future__ import annotations

from medfm.data import Task
from medfm.errors import InvalidArgumentError
from medfm.resolve.defaults import C_GRID, LOGREG_MAX_ITER, LOGREG_TOL
from medfm.resolve.methods import MethodOption, MethodSpec, declare

SELECTIONS = ("val", "holdout")  # where C is chosen
SELECT_BY = ("loss", "primary")  # what chooses C on the selection split; the first is the default
HOLDOUT_FRACTION = 0.2  # share of the training subset held out under selection="holdout"
LOSS_MARGIN = 0.02  # select_by="loss": a weaker regularization replaces the best C only if it
#                    lowers the selection log-loss by more than this share (solver noise is less)
PATIENCE = 2  # select_by="loss": the walk stops once the loss has risen this many C values in
#               a row (None: the whole grid)


def primary_metric(task: Task) -> str:
    """The name of a task's primary metric: "auc" for multi-label, else "acc"."""
    return "auc" if task is Task.MULTI_LABEL else "acc"


def select_metric(select_by: str, task: Task) -> str:
    """What a selection rule (`SELECT_BY`) compares, as a result key records it: acc|auc|loss."""
    if select_by not in SELECT_BY:
        raise InvalidArgumentError(
            f"unknown selection rule {select_by!r}; use one of {', '.join(SELECT_BY)}.")
    return "loss" if select_by == "loss" else primary_metric(task)


def params(selection: str, options: dict) -> dict:
    """The settings in a run's key. Rows fitted before issue 12 (C by the primary metric over the
    whole grid) have no select_by/patience: a missing select_by means "primary", and
    `--select-by primary` builds exactly those settings, so such rows are found again."""
    out = {"C_grid": list(C_GRID), "max_iter": LOGREG_MAX_ITER, "tol": LOGREG_TOL,
           "standardize": "train-subset"}
    if options.get("select_by", SELECT_BY[0]) == "loss":
        out.update(select_by="loss", loss_margin=LOSS_MARGIN, patience=PATIENCE)
    if selection == "holdout":
        out["holdout_fraction"] = HOLDOUT_FRACTION
    return out


SPEC = declare(MethodSpec(
    name="logreg", paradigm="linear probe", line_style="-", selections=SELECTIONS,
    params=params,
    select_metric=lambda task, p: select_metric(p.get("select_by", "primary"), task),
    options=(MethodOption("select_by", SELECT_BY[0], SELECT_BY,
                          "logreg: choose C by val log-loss (default) or by the dataset's "
                          "primary metric, ACC/AUC (the rule before 2026-11-28)"),),
    uses_solver=True, seed_changes_fit=lambda selection: selection == "holdout",
))
