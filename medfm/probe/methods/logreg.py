"""Linear probe (`--method logreg`): L2-regularized logistic regression on frozen features, C
chosen on validation.

    from medfm.probe import LogisticProbe
    probe = LogisticProbe(solver="torch").fit(X_train, y_train, X_val, y_val)
    probe.C_, probe.path_, probe.predict_proba(X_test)

Protocol. Features are standardized with the mean and standard deviation of the training subset
(a constant feature keeps scale 1). The C grid (`C_GRID`, log-spaced) is walked from strong to
weak regularization, each fit warm-started from the previous one (the batched solver on a GPU
solves every C at once instead, and the rule below reads its solutions in the same order); at
every C the model minimizes C * sum(logloss) + 0.5 * ||W||^2 with an unpenalized intercept
(scikit-learn's objective, in every solver) and is scored on a selection split. C is chosen by
`select_by` (medfm.probe.targets):
- `loss` (default since issue 12): walking from strong to weak regularization, a C replaces the
  best so far only if it lowers the log-loss on the selection split by more than LOSS_MARGIN
  (2%) of the best: a smaller gain is within solver noise where the loss flattens. The walk
  stops once the loss has risen PATIENCE C values in a row: it falls and then rises along the
  path, and on every real and synthetic store studied the stopped walk chose the C of the whole
  walk (docs/probe_selection.md), without the slow fits at weak regularization.
- `primary`: the first C with the best primary metric (MedMNIST ACC, or mean per-label AUC for
  multi-label ChestMNIST), ties to the stronger regularization, over the whole grid. This was the
  rule before issue 12 (registry rows with select_metric "acc"/"auc"); on small val splits ACC
  is flat over many C values and the choice follows solver noise.
Selection splits:
- `val`: the official validation split; the model fitted at the chosen C is kept.
- `holdout`: HOLDOUT_FRACTION of the training subset, drawn stratified by medfm.sampling (seeded
  by `random_state`, >= 1 image of each class kept for training), so a small fraction never sees
  the full val labels; the path is fitted on the rest, then the model is refitted on the whole
  training subset (standardized afresh) at the chosen C. The val split is never read.
Tasks: binary fits one sigmoid logit (predict_proba (N, 2)); multi-class and ordinal fit a
multinomial softmax (MedMNIST scores ordinal as multi-class); multi-label fits one independent
binary probe per label; a label with a single value in training gets a constant probe
(zero weights, intercept +-CONSTANT_LOGIT).
The C values walked, with the selection split's loss and primary metric, iterations and
convergence at each, are kept in `path_`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import numpy as np

from medfm.data import Task
from medfm.errors import InvalidArgumentError
from medfm.probe.estimator import ProbeEstimator
from medfm.probe.methods import Fitted, register
from medfm.probe.solvers import DEFAULT_MAX_ITER, DEFAULT_TOL, Solution, make_solver
from medfm.probe.targets import Targets, encode_like, encode_targets, selection_metrics
from medfm.resolve.defaults import C_GRID
from medfm.resolve.methods.logreg import (HOLDOUT_FRACTION, LOSS_MARGIN, PATIENCE, SELECT_BY,
                                          SELECTIONS, primary_metric, select_metric)
from medfm.sampling import SubsetSpec, sample

C_SEARCHES = ("auto", "walk", "batch")  # how the grid is solved: the warm-started walk, every C
#                                          at once (batched solver), or the solver's choice
CONSTANT_LOGIT = 13.8  # logit of a label seen with one value only: probability 1 - 1e-6
STANDARDIZE_ROWS = 8192  # rows per block when computing a feature's mean and std


def _kind(task: Task) -> str:
    return {Task.BINARY: "binary", Task.MULTI_CLASS: "multinomial",
            Task.MULTI_LABEL: "multilabel"}[task]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) without overflow, float64."""
    out = np.empty_like(z, dtype=np.float64)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    e = np.exp(z[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, float64."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _is_tensor(X) -> bool:
    """Whether X is a torch tensor (features resident on a device), without importing torch."""
    return type(X).__module__.partition(".")[0] == "torch"


def _logits(Z, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """(N, K') float64 logits of standardized Z: float32 products, as the fit computed them; a
    tensor Z is multiplied on its device and only the logits come back."""
    if _is_tensor(Z):
        import torch  # only with tensor features: numpy callers never import it

        weights = torch.as_tensor(coef.T, dtype=torch.float32, device=Z.device)
        return (Z @ weights).double().cpu().numpy() + intercept
    return Z @ coef.T.astype(np.float32) + intercept


def _proba(Z, coef: np.ndarray, intercept: np.ndarray, task: Task) -> np.ndarray:
    """Probabilities from standardized features Z (N, D): (N, 2), (N, K) or (N, L) float64."""
    logits = _logits(Z, coef, intercept)  # (N, K') float64
    if task is Task.BINARY:
        p = _sigmoid(logits[:, 0])
        return np.stack([1.0 - p, p], axis=1)
    if task is Task.MULTI_CLASS:
        return _softmax(logits)
    return _sigmoid(logits)


class LogisticProbe(ProbeEstimator):
    """Standardize, walk a C grid with warm starts, choose C on val or a holdout (module doc).

    Learned: `coef_` (K', D) and `intercept_` (K',) in standardized space, `mean_`/`scale_`
    (D,), `classes_`, `C_`, `path_` (per C walked: C, loss, acc or auc, n_iter, converged),
    `task_`, and how it was fitted: `solver_` (the concrete solver), `device_` and
    `preconditioned_` (the batched solver's M, medfm.probe.batched).
    `patience` (select_by="loss" only) stops the walk once the loss has risen that many C values
    in a row; None walks the whole grid. `c_search` says how the grid is solved (`C_SEARCHES`):
    "walk" one C at a time from the last solution, "batch" every C at once (the batched solver;
    the rule then reads the solutions in grid order, stopping where the walk would), "auto" as
    the solver prefers (batch on CUDA). The choice changes rounding, not the rule; so does
    `precondition` (the batched solver's: True, False, None by the problem's size).
    """

    def __init__(self, *, Cs: Sequence[float] | None = None, solver: str = "auto",
                 selection: str = "val", select_by: str = SELECT_BY[0],
                 loss_margin: float = LOSS_MARGIN, patience: int | None = PATIENCE,
                 holdout_fraction: float = HOLDOUT_FRACTION,
                 max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL,
                 random_state: int = 0, device: str | None = None, c_search: str = "auto",
                 precondition: bool | None = None):
        self.Cs = Cs
        self.solver = solver
        self.selection = selection
        self.select_by = select_by
        self.loss_margin = loss_margin
        self.patience = patience
        self.holdout_fraction = holdout_fraction
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.device = device
        self.c_search = c_search
        self.precondition = precondition

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None,
            y_val: np.ndarray | None = None) -> LogisticProbe:
        """Fit on (X, y); choose C on (X_val, y_val) (selection="val") or on a holdout of (X, y).

        X and X_val are numpy arrays, or torch tensors resident on a device (the batched solver
        on CUDA): then standardization, the fits and the selection's products stay there."""
        X = _as_features(X)
        targets = encode_targets(y)
        grid = [float(c) for c in (C_GRID if self.Cs is None else self.Cs)]
        if not grid or min(grid) <= 0:
            raise InvalidArgumentError(f"Cs must be positive values; got {grid}.")
        if self.c_search not in C_SEARCHES:
            raise InvalidArgumentError(f"c_search must be one of {', '.join(C_SEARCHES)}; got "
                                       f"{self.c_search!r}.")
        if self.selection not in SELECTIONS:
            raise InvalidArgumentError(
                f"unknown selection {self.selection!r}; use one of {', '.join(SELECTIONS)}.")
        metric = select_metric(self.select_by, targets.task)  # validates select_by
        if not 0.0 <= self.loss_margin < 1.0:
            raise InvalidArgumentError(
                f"loss_margin must be in [0, 1); got {self.loss_margin!r}.")
        if self.patience is not None and (int(self.patience) != self.patience
                                          or self.patience < 1):
            raise InvalidArgumentError(
                f"patience must be a positive integer or None; got {self.patience!r}.")
        if self.selection == "holdout":
            fit_rows, held = self._holdout_split(targets)
            X_sel, y_sel = X[held], targets.encoded[held]
        else:
            fit_rows = slice(None)
            if X_val is None or y_val is None:
                if len(grid) > 1:
                    raise InvalidArgumentError(
                        "selection='val' needs X_val and y_val to choose C; pass the val split, "
                        "or use selection='holdout'.")
                X_sel = y_sel = None
            else:
                X_sel, y_sel = _as_features(X_val), encode_like(y_val, targets)
        sub = Targets(targets.task, targets.classes, targets.encoded[fit_rows])
        mean, scale, Z = _standardize(X[fit_rows])
        Z_sel = None if X_sel is None else _scaled(X_sel, mean, scale)
        solver, active = self._solver(Z, sub)
        with _blas_single_threaded(solver):  # numpy beside torch on the same cores
            self.solver_, self.device_ = solver.name, solver.device_type
            self.preconditioned_ = bool(getattr(solver, "preconditioned", False))
            together = solver.solves_path if self.c_search == "auto" else self.c_search == "batch"
            if together and not hasattr(solver, "fit_path"):
                raise InvalidArgumentError(f"solver {solver.name} fits one C at a time; use "
                                           "solver='batched' for c_search='batch'.")
            if together:  # every C at once; the rule below reads them in grid order
                solved = iter(solver.fit_path(grid))
                fit_at = lambda C: next(solved)  # noqa: E731
            else:  # the warm-started walk: each C starts from the previous solution
                fit_at = solver.fit
            path, best, final = self._walk(fit_at, grid, metric, active, sub, Z_sel, y_sel)
            if self.selection == "holdout":  # refit on the whole training subset at the chosen C
                mean, scale, Z = _standardize(X)
                solver, active = self._solver(Z, targets)
                rows = slice(None) if active is None else active
                init = Solution(final.coef[rows], final.intercept[rows], 0, True)
                final = self._expand(solver.fit(grid[best], init=init), active, targets)
        self.task_ = targets.task
        self.classes_ = targets.classes
        self.mean_, self.scale_ = mean, scale
        self.coef_, self.intercept_ = final.coef, final.intercept
        self.C_ = grid[best]
        self.n_iter_, self.converged_ = final.n_iter, final.converged
        self.path_ = path
        self.select_metric_ = metric
        self.n_features_in_ = X.shape[1]
        return self

    def _walk(self, fit_at, grid: list[float], metric: str, active, sub: Targets, Z_sel,
              y_sel) -> tuple[list[dict], int, Solution]:
        """(path, index of the chosen C, its solution): the grid fitted in order by `fit_at`,
        each C scored on the selection split, C chosen by `select_by` (module docstring)."""
        task = sub.task
        # "better" is strict (loss: by more than loss_margin), so ties go to the stronger
        # regularization; NaN is never better
        sign = 1.0 if metric == "loss" else -1.0  # minimize sign * value
        keep = 1.0 - self.loss_margin if metric == "loss" else 1.0  # of the best, to beat it
        patience = self.patience if metric == "loss" else None
        path, best, best_value, final, rising = [], 0, np.inf, None, 0
        for i, C in enumerate(grid):
            solution = self._expand(fit_at(C), active, sub)
            scores = ({"loss": float("nan"), primary_metric(task): float("nan")}
                      if Z_sel is None else selection_metrics(
                          y_sel, _proba(Z_sel, solution.coef, solution.intercept, task),
                          task))
            path.append({"C": C, **scores, "n_iter": solution.n_iter,
                         "converged": solution.converged})
            value = sign * scores[metric] if not np.isnan(scores[metric]) else np.inf
            rising = rising + 1 if i and value > sign * path[-2][metric] else 0
            if final is None or value < best_value * keep:
                best, best_value, final = i, value, solution
            elif patience is not None and rising >= patience:
                break  # the loss has turned: it rose `patience` C values in a row
        return path, best, final

    def _holdout_split(self, targets: Targets) -> tuple[np.ndarray, np.ndarray]:
        """(fit rows, holdout rows): a stratified 1 - holdout_fraction of each class is kept."""
        if not 0.0 < self.holdout_fraction < 1.0:
            raise InvalidArgumentError(
                f"holdout_fraction must be in (0, 1); got {self.holdout_fraction}.")
        kept = sample(targets.encoded, targets.task,
                      SubsetSpec(fraction=1.0 - self.holdout_fraction, seed=self.random_state))
        held = np.setdiff1d(np.arange(len(targets.encoded)), kept.indices)
        if held.size == 0:
            raise InvalidArgumentError(
                f"the training subset ({len(targets.encoded)} images) is too small to hold out "
                f"{self.holdout_fraction:.0%} per class for choosing C; use selection='val' or "
                "a larger fraction / more shots.")
        return kept.indices, held

    def _solver(self, Z: np.ndarray, targets: Targets):
        """A solver for the labels that vary (multi-label constant labels are set aside)."""
        Y, active = targets.encoded, None
        if targets.task is Task.MULTI_LABEL:
            active = np.flatnonzero((Y.min(axis=0) == 0) & (Y.max(axis=0) == 1))
            Y = Y[:, active]
        return make_solver(self.solver, Z, Y, _kind(targets.task), max_iter=self.max_iter,
                           tol=self.tol, device=self.device,
                           n_classes=len(targets.classes),
                           precondition=self.precondition), active

    @staticmethod
    def _expand(solution: Solution, active: np.ndarray | None, targets: Targets) -> Solution:
        """Multi-label: put the active labels' rows back among constant probes."""
        if active is None or targets.task is not Task.MULTI_LABEL:
            return solution
        n_labels = targets.encoded.shape[1]
        coef = np.zeros((n_labels, solution.coef.shape[1]))
        sign = np.where(targets.encoded.max(axis=0) == 1, 1.0, -1.0)
        intercept = sign * CONSTANT_LOGIT
        coef[active], intercept[active] = solution.coef, solution.intercept
        return Solution(coef, intercept, solution.n_iter, solution.converged)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, 2) binary, (N, K) multi-class, (N, L) multi-label probabilities, float64."""
        return _proba(_scaled(_as_features(X), self.mean_, self.scale_), self.coef_,
                      self.intercept_, self.task_)


def _blas_single_threaded(solver):
    """numpy's BLAS limited to one thread while a torch solver fits on the CPU: the selection's
    numpy products between two fits otherwise leave OpenBLAS threads spinning on the cores that
    torch's threads need next (PathMNIST-shaped probe on 2 cores: fraction 0.01 fits 1.0 -> 0.55 s,
    0.1 fits 1.7 -> 1.3 s). Elsewhere, nothing changes."""
    if solver.torch_threads and solver.device_type == "cpu":
        return _thread_pools().limit(limits=1, user_api="blas")
    return contextlib.nullcontext()


@functools.cache
def _thread_pools():
    """The process's thread pools, inspected once (1.3 ms per inspection; numpy's BLAS is
    loaded before any fit)."""
    from threadpoolctl import ThreadpoolController  # scikit-learn's dependency; only here

    return ThreadpoolController()


def _as_features(X):
    """float32 features: a numpy array, or a torch tensor left on its device."""
    if _is_tensor(X):
        return X if X.dtype.is_floating_point and X.dtype.itemsize == 4 else X.float()
    return np.asarray(X, dtype=np.float32)


def _scaled(X, mean: np.ndarray, scale: np.ndarray):
    """(X - mean) / scale in float32, on X's device for a tensor."""
    if _is_tensor(X):
        import torch  # only with tensor features: numpy callers never import it

        return ((X - torch.as_tensor(mean, device=X.device))
                / torch.as_tensor(scale, device=X.device))
    return (X - mean) / scale


def _standardize(X) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean (D,), scale (D,), standardized float32 copy); a constant feature keeps scale 1.

    Mean and variance accumulate in float64 over blocks of STANDARDIZE_ROWS rows (two passes),
    so a 90k x 1280 matrix never needs a float64 copy of itself. A tensor is standardized on its
    device (the copy stays there; mean and scale come back).
    """
    if _is_tensor(X):
        return _standardize_tensor(X)
    n = len(X)
    total = np.zeros(X.shape[1])
    for lo in range(0, n, STANDARDIZE_ROWS):
        total += X[lo:lo + STANDARDIZE_ROWS].sum(axis=0, dtype=np.float64)
    mean64 = total / n
    squares = np.zeros(X.shape[1])
    for lo in range(0, n, STANDARDIZE_ROWS):
        centred = np.subtract(X[lo:lo + STANDARDIZE_ROWS], mean64, dtype=np.float64)
        squares += np.einsum("ij,ij->j", centred, centred)
    mean = mean64.astype(np.float32)
    scale = np.sqrt(squares / n).astype(np.float32)
    scale[scale == 0] = 1.0
    Z = np.subtract(X, mean, dtype=np.float32)
    Z /= scale
    return mean, scale, Z


def _standardize_tensor(X):
    """`_standardize` of a float32 tensor on its device: float64 moments over row blocks."""
    import torch  # only with tensor features: numpy callers never import it

    n, total = len(X), torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    for lo in range(0, n, STANDARDIZE_ROWS):
        total += X[lo:lo + STANDARDIZE_ROWS].sum(dim=0, dtype=torch.float64)
    mean64 = total / n
    squares = torch.zeros_like(total)
    for lo in range(0, n, STANDARDIZE_ROWS):
        centred = X[lo:lo + STANDARDIZE_ROWS].double() - mean64
        squares += (centred * centred).sum(dim=0)
    mean = mean64.float()
    scale = torch.sqrt(squares / n).float()
    scale[scale == 0] = 1.0
    return mean.cpu().numpy(), scale.cpu().numpy(), (X - mean) / scale


# -- the method --------------------------------------------------------------------------------

def _fit(features: dict, labels: dict, task: Task, train_rows: np.ndarray, *, params: dict,
         selection: str, seed: int, solver: str, device: str | None) -> Fitted:
    model = LogisticProbe(Cs=params["C_grid"], solver=solver, selection=selection,
                          select_by=params.get("select_by", "primary"),
                          loss_margin=params.get("loss_margin", 0.0),
                          patience=params.get("patience"),
                          holdout_fraction=params.get("holdout_fraction", HOLDOUT_FRACTION),
                          max_iter=params["max_iter"], tol=params["tol"], random_state=seed,
                          device=device)
    everything = len(train_rows) == len(labels["train"])  # fraction 1.0: no copy of the split
    X = features["train"] if everything else features["train"][_rows_for(features["train"],
                                                                          train_rows)]
    y = labels["train"] if everything else labels["train"][train_rows]
    if selection == "val":
        model.fit(X, y, features["val"], labels["val"])
    else:  # holdout: the val split is never read
        model.fit(X, y)
    extra = {"path": model.path_, "n_iter": model.n_iter_, "converged": bool(model.converged_),
             "preconditioned": model.preconditioned_}
    return Fitted(model.predict_proba(features["test"]).astype(np.float32), model.C_, extra,
                  model.solver_, model.device_, model=model)


def _rows_for(X, rows: np.ndarray):
    """Row indices to gather from X: on X's device for a tensor."""
    if _is_tensor(X):
        import torch  # only with tensor features: numpy callers never import it

        return torch.tensor(rows, device=X.device)  # a copy: subset indices are read-only
    return rows


def _save_state(model: LogisticProbe) -> dict:
    """What scores new features: standardization, weights, task and classes (a few KB)."""
    return {"mean": model.mean_, "scale": model.scale_, "coef": model.coef_,
            "intercept": model.intercept_, "classes": np.asarray(model.classes_),
            "task": np.array(model.task_.value)}


def _load_state(state: dict) -> LogisticProbe:
    model = LogisticProbe()
    model.mean_, model.scale_ = state["mean"], state["scale"]
    model.coef_, model.intercept_ = state["coef"], state["intercept"]
    model.classes_, model.task_ = state["classes"], Task(str(state["task"]))
    return model


METHOD = register("logreg", fit=_fit, save_state=_save_state, load_state=_load_state)
