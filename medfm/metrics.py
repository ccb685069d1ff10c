"""MedMNIST-exact ACC and AUC, balanced accuracy, and percentile bootstrap confidence intervals.

    from medfm.metrics import evaluate
    m = evaluate(y_true, y_score, Task.MULTI_CLASS)  # y_true (N, 1), y_score (N, C) probabilities
    m.acc, m.auc, m.balanced_acc, m.acc_ci, m.auc_ci

Definitions (identical to `medmnist.evaluator.getAUC` / `getACC` on the same scores):

- AUC. Multi-label: mean over the labels of each label's ROC-AUC. Binary: ROC-AUC of
  `score[:, -1]` (the probability of class 1; a (N,) or (N, 1) score is that probability).
  Multi-class and ordinal: mean over the C score columns of one-vs-rest ROC-AUC. ROC-AUC is the
  area under the trapezoidal ROC curve, computed here as the Mann-Whitney statistic with ties
  counted one half (the same number). It is NaN when a column has no positives or no negatives
  (scikit-learn, and so medmnist, also gives NaN there, with a warning).
- ACC. Multi-label: mean over the labels of the accuracy of `score > threshold`. Binary: accuracy
  of `score[:, -1] > threshold`. Multi-class and ordinal: accuracy of the argmax.
  ChestMNIST's ACC is ~94.7 for a model that predicts every label negative, so AUC is its
  primary metric.
- Balanced accuracy (not in medmnist). Mean over the classes present in `y_true` of the recall
  of that class, on the same predictions as ACC at 0.5 (sklearn's `balanced_accuracy_score`).
  Multi-label: the mean over labels of each label's balanced accuracy.
- Confidence intervals. Percentile bootstrap over test samples: `n_bootstrap` resamples of N
  samples drawn with replacement from a seeded generator; the interval is the
  ((1 - ci) / 2, (1 + ci) / 2) quantiles of the metric over the resamples. Resamples where the
  metric is undefined (an AUC column with a class missing) are skipped. `evaluate` scores all
  resamples at once as per-sample counts (a duplicated sample is a weight of 2), which gives
  exactly the numbers that `bootstrap_ci` gets by re-indexing, in a fraction of the time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from medfm.data import Task
from medfm.errors import InvalidArgumentError

DEFAULT_THRESHOLD = 0.5  # binary and multi-label decision threshold (medmnist's getACC default)
DEFAULT_N_BOOTSTRAP = 1000  # bootstrap resamples per confidence interval
DEFAULT_CI = 0.95  # confidence level of the percentile intervals
BOOTSTRAP_CHUNK = 64  # resamples scored together: a (64, N) weight matrix at a time


@dataclass(frozen=True)
class Metrics:
    """Test-split metrics of one set of scores, as fractions in [0, 1]."""

    acc: float  # MedMNIST ACC (primary metric for all but ChestMNIST)
    auc: float  # MedMNIST AUC (primary metric for ChestMNIST)
    balanced_acc: float  # mean per-class recall (multi-label: mean over labels)
    acc_ci: tuple[float, float]  # percentile bootstrap interval of acc
    auc_ci: tuple[float, float]  # percentile bootstrap interval of auc


def _true_and_score(
    y_true: np.ndarray, y_score: np.ndarray, task: Task
) -> tuple[np.ndarray, np.ndarray]:
    """Validated (labels, scores): multi-label (N, L) and (N, L); binary (N,) and P(class 1) (N,);
    multi-class and ordinal (N,) and (N, C)."""
    task = Task(task)
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    n = y_true.shape[0] if y_true.ndim else 0
    if n == 0 or y_score.ndim == 0 or y_score.shape[0] != n:
        raise InvalidArgumentError(
            f"y_true {y_true.shape} and y_score {y_score.shape} must be non-empty and have the "
            "same number of rows (one per test image)."
        )
    if task is Task.MULTI_LABEL:
        if y_true.ndim != 2 or y_score.shape != y_true.shape:
            raise InvalidArgumentError(
                f"multi-label scores need y_true and y_score of the same shape (N, L); got "
                f"{y_true.shape} and {y_score.shape}."
            )
        return y_true.astype(np.int64), y_score
    if y_true.ndim == 2 and y_true.shape[1] == 1:
        y_true = y_true[:, 0]
    if y_true.ndim != 1:
        raise InvalidArgumentError(
            f"{task.value} labels must be (N,) or (N, 1); got {y_true.shape}."
        )
    y_true = y_true.astype(np.int64)
    if task is Task.BINARY:
        if y_score.ndim == 2 and y_score.shape[1] in (1, 2):
            y_score = y_score[:, -1]
        if y_score.ndim != 1:
            raise InvalidArgumentError(
                f"binary scores must be (N, 2), (N, 1) or (N,) (probability of class 1); got "
                f"{y_score.shape}."
            )
        return y_true, y_score
    if y_score.ndim != 2 or y_score.shape[1] < 2 or y_true.max() >= y_score.shape[1]:
        raise InvalidArgumentError(
            f"{task.value} scores must be (N, C) with a column per class (labels go up to "
            f"{y_true.max()}); got {y_score.shape}."
        )
    return y_true, y_score


def _predictions(
    y_true: np.ndarray, y_score: np.ndarray, task: Task, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predicted labels), shaped (N, L) for multi-label and (N,) otherwise."""
    y_true, y_score = _true_and_score(y_true, y_score, task)
    if Task(task) in (Task.MULTI_LABEL, Task.BINARY):
        return y_true, (y_score > threshold).astype(np.int64)
    return y_true, np.argmax(y_score, axis=-1)


def _auc_columns(
    y_true: np.ndarray, y_score: np.ndarray, task: Task
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(score column, positive indicator) pairs whose ROC-AUCs average to the task's AUC."""
    y_true, y_score = _true_and_score(y_true, y_score, task)
    if Task(task) is Task.BINARY:
        return [(y_score, y_true == 1)]
    if Task(task) is Task.MULTI_LABEL:
        return [(y_score[:, j], y_true[:, j] == 1) for j in range(y_true.shape[1])]
    return [(y_score[:, i], y_true == i) for i in range(y_score.shape[1])]


class _WeightedAUC:
    """Task AUC under per-sample integer weights (B, N), one value per weight row.

    For each column the smaller class is the reference: its samples sorted by score, and for
    every sample of the other class the positions where its score enters that sorted list
    (left and right of ties). Under weights, the reference's cumulative weight at those
    positions counts the reference samples strictly below (left) and at or below (right), so
    2 * (Mann-Whitney U) is an exact integer sum and one division gives the AUC.
    """

    def __init__(self, y_true: np.ndarray, y_score: np.ndarray, task: Task) -> None:
        self.columns = []
        for score, positive in _auc_columns(y_true, y_score, task):
            pos_rows, neg_rows = np.flatnonzero(positive), np.flatnonzero(~positive)
            ref_is_pos = pos_rows.size <= neg_rows.size
            ref, query = (pos_rows, neg_rows) if ref_is_pos else (neg_rows, pos_rows)
            ref = ref[np.argsort(score[ref], kind="stable")]
            below = np.searchsorted(score[ref], score[query], side="left")
            at_or_below = np.searchsorted(score[ref], score[query], side="right")
            self.columns.append((ref_is_pos, ref, query, below, at_or_below))

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        total = np.zeros(weights.shape[0])
        for ref_is_pos, ref, query, below, at_or_below in self.columns:
            cum = np.zeros((weights.shape[0], ref.size + 1), dtype=np.int64)
            np.cumsum(np.take(weights, ref, axis=1), axis=1, out=cum[:, 1:])  # (B, R + 1)
            w_query = np.take(weights, query, axis=1).astype(np.int64)  # (B, Q)
            twice = (w_query * (np.take(cum, below, axis=1) + np.take(cum, at_or_below, axis=1)))
            twice = twice.sum(axis=1)  # sum over queries of 2 * (ref weight below, ties half)
            n_ref, n_query = cum[:, -1], w_query.sum(axis=1)
            # U counts (positive, negative) pairs with the positive above; ref below a query
            # positive is such a pair, ref below a query negative is the opposite
            twice_u = 2 * n_ref * n_query - twice if ref_is_pos else twice
            with np.errstate(invalid="ignore", divide="ignore"):
                area = twice_u / (2.0 * n_ref * n_query)
            total += np.where((n_ref > 0) & (n_query > 0), area, np.nan)
        return total / len(self.columns)


def auc(y_true: np.ndarray, y_score: np.ndarray, task: Task) -> float:
    """MedMNIST AUC (see the module docstring); NaN when a column lacks positives or negatives."""
    n = np.asarray(y_true).shape[0]
    return float(_WeightedAUC(y_true, y_score, task)(np.ones((1, n), dtype=np.int64))[0])


def acc(
    y_true: np.ndarray, y_score: np.ndarray, task: Task, threshold: float = DEFAULT_THRESHOLD
) -> float:
    """MedMNIST ACC: argmax accuracy, or `score > threshold` for binary and multi-label
    (multi-label: mean over labels of per-label accuracy)."""
    true, pred = _predictions(y_true, y_score, task, threshold)
    correct = (true == pred).astype(np.float64)
    if correct.ndim == 2:
        return float(correct.mean(axis=0).mean())
    return float(correct.mean())


def _balanced_accuracy_1d(true: np.ndarray, pred: np.ndarray) -> float:
    """Mean over the classes present in `true` of their recall."""
    classes = np.unique(true)
    return float(np.mean([np.mean(pred[true == c] == c) for c in classes]))


def balanced_acc(y_true: np.ndarray, y_score: np.ndarray, task: Task) -> float:
    """Balanced accuracy on ACC's predictions at threshold 0.5: mean recall over the classes
    present in y_true; multi-label: mean over labels of each label's balanced accuracy."""
    true, pred = _predictions(y_true, y_score, task, DEFAULT_THRESHOLD)
    if true.ndim == 2:
        return float(
            np.mean([_balanced_accuracy_1d(true[:, j], pred[:, j]) for j in range(true.shape[1])])
        )
    return _balanced_accuracy_1d(true, pred)


def _check_bootstrap(n_bootstrap: int, ci: float) -> None:
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 1:
        raise InvalidArgumentError(f"n_bootstrap must be a positive integer; got {n_bootstrap}.")
    if not 0.0 < ci < 1.0:
        raise InvalidArgumentError(f"ci is a confidence level in (0, 1), e.g. 0.95; got {ci}.")


def _resample_indices(n: int, n_bootstrap: int, seed: int) -> Iterator[np.ndarray]:
    """The bootstrap resamples, BOOTSTRAP_CHUNK at a time: (b, n) row indices drawn with
    replacement. Every CI in this module with the same (n, n_bootstrap, seed) uses these."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_bootstrap, BOOTSTRAP_CHUNK):
        yield rng.integers(0, n, size=(min(BOOTSTRAP_CHUNK, n_bootstrap - start), n))


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(b, n) resample indices -> (b, n) int64 multiplicity of each sample in each resample."""
    b = indices.shape[0]
    flat = (indices + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n)


def _percentile_interval(values: list[float] | np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval of the finite values; (nan, nan) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    low, high = np.quantile(values, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
    return (float(low), float(high))


def bootstrap_ci(
    y_true: np.ndarray,
    y_score: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    *,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    ci: float = DEFAULT_CI,
) -> tuple[float, float]:
    """Percentile bootstrap interval of any `metric_fn(y_true, y_score)` over test-sample resamples.

    Calls `metric_fn` once per resample; resamples where it returns NaN (undefined, as `auc`
    does when a class is missing) are skipped. For ACC and AUC `evaluate` gives the same
    intervals, vectorised.
    """
    _check_bootstrap(n_bootstrap, ci)
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    values = [
        metric_fn(y_true[rows], y_score[rows])
        for chunk in _resample_indices(y_true.shape[0], n_bootstrap, seed)
        for rows in chunk
    ]
    return _percentile_interval(values, ci)


def evaluate(
    y_true: np.ndarray,
    y_score: np.ndarray,
    task: Task,
    *,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    ci: float = DEFAULT_CI,
) -> Metrics:
    """ACC, AUC, balanced accuracy and bootstrap CIs of ACC and AUC (same resamples for both).

    Resamples are scored as integer count matrices: ACC of a resample is counts @ correct labels
    per sample / (N * L), and AUC is the count-weighted Mann-Whitney statistic.
    """
    _check_bootstrap(n_bootstrap, ci)
    true, pred = _predictions(y_true, y_score, task, DEFAULT_THRESHOLD)
    correct = (true == pred).reshape(true.shape[0], -1)  # (N, L), L = 1 unless multi-label
    n, n_labels = correct.shape
    n_correct = correct.sum(axis=1)  # (N,) correct labels per sample
    weighted_auc = _WeightedAUC(y_true, y_score, task)
    acc_values, auc_values = [], []
    for indices in _resample_indices(n, n_bootstrap, seed):
        counts = _counts(indices, n)  # (b, N)
        acc_values.append(counts @ n_correct / (n * n_labels))
        auc_values.append(weighted_auc(counts))
    return Metrics(
        acc=acc(y_true, y_score, task),
        auc=float(weighted_auc(np.ones((1, n), dtype=np.int64))[0]),
        balanced_acc=balanced_acc(y_true, y_score, task),
        acc_ci=_percentile_interval(np.concatenate(acc_values), ci),
        auc_ci=_percentile_interval(np.concatenate(auc_values), ci),
    )
