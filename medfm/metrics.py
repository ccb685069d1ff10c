"""MedMNIST-exact ACC and AUC, balanced accuracy, calibration (ECE, Brier, NLL), and percentile
bootstrap confidence intervals of each.

    from medfm.metrics import evaluate
    m = evaluate(y_true, y_score, Task.MULTI_CLASS)  # y_true (N, 1), y_score (N, C) probabilities
    m.acc, m.auc, m.balanced_acc, m.ece, m.brier, m.nll, m.acc_ci, ..., m.nll_ci

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
- Expected calibration error (ECE; lower is better), top-label with `ECE_BINS` = 15 equal-width
  bins: each sample's confidence is the probability of its predicted class (multi-class and
  ordinal: the largest score, predicted class its argmax; binary: max(p, 1 - p) with p the
  probability of class 1 and the prediction p > 0.5, as ACC). Bin b holds the confidences in
  (b / 15, (b + 1) / 15] (bin 0 also takes 0). ECE = sum over bins of (share of samples in the
  bin) * |accuracy in the bin - mean confidence in the bin| = (1 / N) * sum over bins of
  |sum over its samples of (correct - confidence)|. Multi-label: the mean over labels of each
  label's binary ECE (on that label's probability, as binary).
- Brier score (lower is better). Multi-class and ordinal: mean over samples of the sum over
  classes of (p_c - onehot_c)^2 (in [0, 2]). Binary: mean of (p - y)^2 on the probability of
  class 1 (in [0, 1]; scikit-learn's `brier_score_loss`; half the two-column sum). Multi-label:
  the mean over labels of each label's binary Brier score.
- Negative log-likelihood (NLL, natural log, lower is better): mean over samples of -log of the
  probability given to the true class; binary: -(y log p + (1 - y) log(1 - p)); multi-label: the
  mean over labels of each label's binary NLL. Probabilities are clipped to [1e-12, 1 - 1e-12]
  (`NLL_CLIP`; multi-class: the true class's probability to [1e-12, 1], rows are not
  renormalized), so one confidently wrong sample costs at most -log(1e-12) = 27.6.
- Confidence intervals. Percentile bootstrap over test samples: `n_bootstrap` resamples of N
  samples drawn with replacement from a seeded generator; the interval is the
  ((1 - ci) / 2, (1 + ci) / 2) quantiles of the metric over the resamples. Resamples where the
  metric is undefined (an AUC column with a class missing) are skipped. `evaluate` scores all
  resamples at once as per-sample counts (a duplicated sample is a weight of 2), which gives
  exactly the numbers that `bootstrap_ci` gets by re-indexing, in a fraction of the time: Brier and
  NLL are count-weighted means of per-sample terms, ECE is the count-weighted per-bin sum of
  (correct - confidence), and balanced accuracy is count-weighted per-class recalls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from medfm.data import Task
from medfm.errors import InvalidArgumentError
from medfm.resolve.defaults import CI_LEVEL, N_BOOTSTRAP

DEFAULT_THRESHOLD = 0.5  # binary and multi-label decision threshold (medmnist's getACC default)
DEFAULT_N_BOOTSTRAP = N_BOOTSTRAP  # bootstrap resamples per confidence interval
DEFAULT_CI = CI_LEVEL  # confidence level of the percentile intervals
BOOTSTRAP_CHUNK = 64  # resamples scored together: a (64, N) weight matrix at a time
BOOTSTRAP_DEVICE_CHUNK = 256  # resamples uploaded and scored together on a device
ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
NLL_CLIP = 1e-12  # probabilities are clipped to [NLL_CLIP, 1 - NLL_CLIP] before the log


@dataclass(frozen=True)
class Metrics:
    """Metrics of one set of test scores (definitions in the module docstring); ACC, AUC,
    balanced accuracy and ECE are fractions in [0, 1]."""

    acc: float  # MedMNIST ACC (primary metric for all but ChestMNIST)
    auc: float  # MedMNIST AUC (primary metric for ChestMNIST)
    balanced_acc: float  # mean per-class recall (multi-label: mean over labels)
    acc_ci: tuple[float, float]  # percentile bootstrap interval of acc
    auc_ci: tuple[float, float]  # percentile bootstrap interval of auc
    balanced_acc_ci: tuple[float, float]  # percentile bootstrap interval of balanced_acc
    ece: float  # expected calibration error, 15 equal-width bins of top-label confidence
    brier: float  # Brier score (binary and multi-label: on the class-1 probability)
    nll: float  # mean negative log-likelihood, natural log, probabilities clipped at 1e-12
    ece_ci: tuple[float, float]  # percentile bootstrap interval of ece
    brier_ci: tuple[float, float]  # percentile bootstrap interval of brier
    nll_ci: tuple[float, float]  # percentile bootstrap interval of nll


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


def _auc_positions(y_true: np.ndarray, y_score: np.ndarray, task: Task):
    """Per AUC column: (ref_is_pos, ref, query, below, at_or_below). The smaller class is the
    reference, its rows sorted by score (one sort per column); each query row (the other class)
    enters that sorted list at `below` (left of ties) and `at_or_below` (right of ties)."""
    for score, positive in _auc_columns(y_true, y_score, task):
        pos_rows, neg_rows = np.flatnonzero(positive), np.flatnonzero(~positive)
        ref_is_pos = pos_rows.size <= neg_rows.size
        ref, query = (pos_rows, neg_rows) if ref_is_pos else (neg_rows, pos_rows)
        ref = ref[np.argsort(score[ref], kind="stable")]
        yield (ref_is_pos, ref, query, np.searchsorted(score[ref], score[query], side="left"),
               np.searchsorted(score[ref], score[query], side="right"))


class _WeightedAUC:
    """Task AUC under per-sample integer weights (B, N), one value per weight row.

    For each column the smaller class is the reference: its samples sorted by score, and for
    every sample of the other class the positions where its score enters that sorted list
    (left and right of ties). Under weights, the reference's cumulative weight at those
    positions counts the reference samples strictly below (left) and at or below (right), so
    2 * (Mann-Whitney U) is an exact integer sum and one division gives the AUC. The other
    class's weights are first summed into the reference positions they enter (one sparse
    product for every column at once), so a resample gathers each sample's weight once, not
    three times per column; every sum is of integers below 2**53 in float64, so exact.
    """

    def __init__(self, y_true: np.ndarray, y_score: np.ndarray, task: Task) -> None:
        import scipy.sparse  # deferred, as for calibration: a rerun imports no SciPy

        self.columns, rows, queries, offset = [], [], [], 0
        for ref_is_pos, ref, query, below, at_or_below in _auc_positions(y_true, y_score, task):
            rows += [offset + below, offset + at_or_below]
            queries += [query, query]
            self.columns.append((ref_is_pos, ref, offset, ref.size + 1))
            offset += ref.size + 1
        rows, queries = np.concatenate(rows), np.concatenate(queries)
        # (positions, N): row `offset + j` of a column sums the weights of the other class's
        # samples entering its sorted reference at j, once per side (twice where no tie)
        self.entering = scipy.sparse.csr_array(
            (np.ones(rows.size), (rows, queries)), shape=(offset, np.asarray(y_true).shape[0]))
        self.entering.sum_duplicates()

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        weights = weights.astype(np.float64, copy=False)  # integer counts: exact
        entering = (self.entering @ np.ascontiguousarray(weights.T)).T  # (B, positions)
        n_all = weights.sum(axis=1)
        total = np.zeros(weights.shape[0])
        for ref_is_pos, ref, offset, size in self.columns:
            cum = np.zeros((weights.shape[0], size))  # reference weight below each position
            np.cumsum(np.take(weights, ref, axis=1), axis=1, out=cum[:, 1:])
            # sum over the other class of 2 * (ref weight below, ties half)
            twice = np.einsum("ij,ij->i", cum, entering[:, offset:offset + size])
            n_ref = cum[:, -1]
            n_query = n_all - n_ref  # the two classes of a column are every sample
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


def _top_label(
    y_true: np.ndarray, y_score: np.ndarray, task: Task
) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of the predicted class, (N, L) for multi-label, (N, 1) otherwise.

    Binary and multi-label: confidence max(p, 1 - p) of the prediction p > 0.5 (ACC's); multi-class
    and ordinal: the largest score and whether its argmax is the label.
    """
    y_true, y_score = _true_and_score(y_true, y_score, task)
    if Task(task) in (Task.MULTI_LABEL, Task.BINARY):
        pred = y_score > DEFAULT_THRESHOLD
        confidence = np.where(pred, y_score, 1.0 - y_score)
        correct = pred == (y_true == 1)
    else:
        confidence = y_score.max(axis=1)
        correct = np.argmax(y_score, axis=1) == y_true
    n = y_true.shape[0]
    return confidence.reshape(n, -1), correct.reshape(n, -1).astype(np.float64)


def _confidence_bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each confidence: (b / n_bins, (b + 1) / n_bins], 0 included in bin 0."""
    return np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def _ece_terms(y_true: np.ndarray, y_score: np.ndarray, task: Task):
    """(L * ECE_BINS, N) sparse: each sample's (correct - confidence) in its label's bin row.

    For sample weights w (B, N): ECE = mean over labels of sum over bins of |terms @ w.T| / sum(w)
    (one non-zero per sample and label, so a resample costs N * L, not N * L * ECE_BINS).
    """
    confidence, correct = _top_label(y_true, y_score, task)
    n, n_labels = confidence.shape
    rows = _confidence_bins(confidence, ECE_BINS) + ECE_BINS * np.arange(n_labels)  # (N, L)
    columns = np.repeat(np.arange(n), n_labels)
    import scipy.sparse  # only when calibration is scored: a rerun imports no SciPy

    return scipy.sparse.csr_array(
        ((correct - confidence).ravel(), (rows.ravel(), columns)),
        shape=(n_labels * ECE_BINS, n),
    )


def _ece_of(terms, weights: np.ndarray) -> np.ndarray:
    """ECE per row of integer sample weights (B, N), each row summing to N."""
    sums = (terms @ weights.T.astype(np.float64, copy=False)).T  # (B, L * ECE_BINS)
    per_label = np.abs(sums).reshape(sums.shape[0], -1, ECE_BINS).sum(axis=2)  # (B, L)
    return per_label.mean(axis=1) / terms.shape[1]


def _brier_and_nll_terms(
    y_true: np.ndarray, y_score: np.ndarray, task: Task
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) per-sample Brier and NLL terms whose means are the task's Brier score and NLL."""
    y_true, y_score = _true_and_score(y_true, y_score, task)
    if Task(task) in (Task.MULTI_LABEL, Task.BINARY):
        p = np.clip(y_score, NLL_CLIP, 1.0 - NLL_CLIP)
        brier = (y_score - y_true) ** 2
        nll = -(y_true * np.log(p) + (1 - y_true) * np.log1p(-p))
        if brier.ndim == 2:  # multi-label: mean over labels
            return brier.mean(axis=1), nll.mean(axis=1)
        return brier, nll
    onehot = np.eye(y_score.shape[1])[y_true]
    brier = ((y_score - onehot) ** 2).sum(axis=1)
    p_true = np.take_along_axis(y_score, y_true[:, None], axis=1)[:, 0]
    return brier, -np.log(np.clip(p_true, NLL_CLIP, 1.0))


def ece(y_true: np.ndarray, y_score: np.ndarray, task: Task) -> float:
    """Expected calibration error, top-label, ECE_BINS equal-width bins (module docstring)."""
    terms = _ece_terms(y_true, y_score, task)
    return float(_ece_of(terms, np.ones((1, terms.shape[1]), dtype=np.int64))[0])


def brier(y_true: np.ndarray, y_score: np.ndarray, task: Task) -> float:
    """Brier score: multi-class sum over classes; binary and multi-label on P(class 1)."""
    return float(_brier_and_nll_terms(y_true, y_score, task)[0].mean())


def nll(y_true: np.ndarray, y_score: np.ndarray, task: Task) -> float:
    """Mean negative log-likelihood of the true labels (probabilities clipped at NLL_CLIP)."""
    return float(_brier_and_nll_terms(y_true, y_score, task)[1].mean())


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin calibration of a set of scores: what a reliability diagram draws."""

    edges: np.ndarray  # (ECE_BINS + 1,) bin edges on the confidence axis, 0 to 1
    confidence: np.ndarray  # (ECE_BINS,) mean confidence in each bin (NaN when empty)
    accuracy: np.ndarray  # (ECE_BINS,) share of correct predictions in each bin (NaN when empty)
    count: np.ndarray  # (ECE_BINS,) samples (multi-label: sample-label pairs) in each bin


def reliability_bins(y_true: np.ndarray, y_score: np.ndarray, task: Task) -> ReliabilityBins:
    """The ECE's bins of top-label confidence and accuracy; multi-label pools all labels."""
    confidence, correct = _top_label(y_true, y_score, task)
    bins = _confidence_bins(confidence, ECE_BINS).ravel()
    count = np.bincount(bins, minlength=ECE_BINS)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, confidence.ravel(), ECE_BINS) / count
        accuracy = np.bincount(bins, correct.ravel(), ECE_BINS) / count
    return ReliabilityBins(np.linspace(0.0, 1.0, ECE_BINS + 1), mean_conf, accuracy, count)


class _WeightedBalancedAccuracy:
    """Balanced accuracy under per-sample integer weights (B, N), one value per weight row.

    Each (label, class) pair present in y_true contributes its recall, weighted hits over
    weighted members; a class with no weight in a resample is absent from it, as it would be
    from the re-indexed labels.
    """

    def __init__(self, y_true: np.ndarray, y_score: np.ndarray, task: Task) -> None:
        true, pred = _predictions(y_true, y_score, task, DEFAULT_THRESHOLD)
        true, pred = true.reshape(true.shape[0], -1), pred.reshape(pred.shape[0], -1)
        members, hits, self.label_of = [], [], []
        for label in range(true.shape[1]):
            for cls in np.unique(true[:, label]):
                member = true[:, label] == cls
                members.append(member)
                hits.append(member & (pred[:, label] == cls))
                self.label_of.append(label)
        # float64 so the products run on BLAS (exact: integer sums far below 2**53)
        self.members = np.stack(members, axis=1).astype(np.float64)  # (N, K)
        self.hits = np.stack(hits, axis=1).astype(np.float64)  # (N, K)
        self.label_of = np.asarray(self.label_of)
        self.n_labels = true.shape[1]

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        weights = weights.astype(np.float64, copy=False)
        size = weights @ self.members  # (B, K)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(size > 0, (weights @ self.hits) / size, np.nan)
        per_label = [np.nanmean(recall[:, self.label_of == label], axis=1)
                     for label in range(self.n_labels)]
        return np.mean(per_label, axis=0)


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


METRIC_NAMES = ("acc", "auc", "balanced_acc", "ece", "brier", "nll")  # what `evaluate` scores


def _weighted_scorers(
    y_true: np.ndarray, y_score: np.ndarray, task: Task, names: Iterable[str]
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Per metric name, a function of integer sample weights (B, N) -> (B,) metric values.

    ACC is weights @ correct labels per sample / (N * L); Brier and NLL are weights @ per-sample
    terms / N; ECE sums per-bin terms under the weights; AUC and balanced accuracy weight their
    classes' members.
    """
    names = tuple(names)
    unknown = set(names) - set(METRIC_NAMES)
    if unknown:
        raise InvalidArgumentError(f"unknown metric(s) {sorted(unknown)}; use {METRIC_NAMES}")
    scorers: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if "acc" in names:
        true, pred = _predictions(y_true, y_score, task, DEFAULT_THRESHOLD)
        correct = (true == pred).reshape(true.shape[0], -1)  # (N, L), L = 1 unless multi-label
        n_correct = correct.sum(axis=1)  # (N,) correct labels per sample
        scorers["acc"] = lambda w: w @ n_correct / correct.size
    if "auc" in names:
        scorers["auc"] = _WeightedAUC(y_true, y_score, task)
    if "balanced_acc" in names:
        scorers["balanced_acc"] = _WeightedBalancedAccuracy(y_true, y_score, task)
    if "ece" in names:
        ece_terms = _ece_terms(y_true, y_score, task)  # (L * ECE_BINS, N) sparse
        scorers["ece"] = lambda w: _ece_of(ece_terms, w)
    if {"brier", "nll"} & set(names):
        brier_nll = np.stack(_brier_and_nll_terms(y_true, y_score, task), axis=1)  # (N, 2)
        scorers["brier"] = lambda w: w @ brier_nll[:, 0] / brier_nll.shape[0]
        scorers["nll"] = lambda w: w @ brier_nll[:, 1] / brier_nll.shape[0]
    return {name: scorers[name] for name in names}


def bootstrap_metrics(
    y_true: np.ndarray,
    y_score: np.ndarray,
    task: Task,
    names: Iterable[str] = METRIC_NAMES,
    *,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    ci: float = DEFAULT_CI,
) -> dict[str, tuple[float, tuple[float, float]]]:
    """(point estimate, percentile interval) of each named metric, all on the same resamples.

    A subset of names costs only what those metrics cost and gives exactly the numbers that
    `evaluate` gives for them (e.g. calibration added to rows whose AUC is already stored).
    """
    _check_bootstrap(n_bootstrap, ci)
    scorers = _weighted_scorers(y_true, y_score, task, names)
    n = np.asarray(y_true).shape[0]
    values: dict[str, list[np.ndarray]] = {name: [] for name in scorers}
    for indices in _resample_indices(n, n_bootstrap, seed):
        counts = _counts(indices, n)  # (b, N) integer weights
        weights = counts.astype(np.float64)  # exact, and the products run on BLAS
        for name, scorer in scorers.items():
            values[name].append(scorer(counts if name == "auc" else weights))
    ones = np.ones((1, n), dtype=np.int64)
    return {
        name: (float(scorer(ones if name == "auc" else ones.astype(np.float64))[0]),
               _percentile_interval(np.concatenate(values[name]), ci))
        for name, scorer in scorers.items()
    }


class _DeviceScorers:
    """Every metric of `METRIC_NAMES` as torch float64 products on a device, for weights (B, N).

    The per-sample terms (correct labels, Brier and NLL terms, the ECE's (correct - confidence)
    per label and bin, class members and hits) are made on the host exactly as the numpy scorers
    make them, then uploaded once; AUC sorts each column's smaller class once and, under weights,
    sums the cumulative reference weight at each query's left and right insertion points (ties
    half), as `_WeightedAUC` does with its sparse product. All sums are float64; the integer
    ones (AUC, counts) are exact, the others agree with the numpy scorers to rounding (~1e-15).
    """

    def __init__(self, y_true: np.ndarray, y_score: np.ndarray, task: Task, device) -> None:
        import torch  # only when metrics are asked for on a device

        self.torch, self.device = torch, torch.device(device)
        up = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64,  # noqa: E731
                                       device=self.device)
        true, pred = _predictions(y_true, y_score, task, DEFAULT_THRESHOLD)
        correct = (true == pred).reshape(true.shape[0], -1)
        self.n_correct, self.n_entries = up(correct.sum(axis=1)), correct.size
        brier_terms, nll_terms = _brier_and_nll_terms(y_true, y_score, task)
        self.brier, self.nll = up(brier_terms), up(nll_terms)
        ece_terms = _ece_terms(y_true, y_score, task)  # (L * ECE_BINS, N) sparse
        self.ece_terms = up(ece_terms.toarray().T)  # (N, L * ECE_BINS)
        balanced = _WeightedBalancedAccuracy(y_true, y_score, task)
        self.members, self.hits = up(balanced.members), up(balanced.hits)
        self.label_of, self.n_labels = balanced.label_of, balanced.n_labels
        index = lambda a: torch.as_tensor(a, dtype=torch.long, device=self.device)  # noqa: E731
        self.auc_columns = [(ref_is_pos, *map(index, arrays)) for ref_is_pos, *arrays
                            in _auc_positions(y_true, y_score, task)]

    def __call__(self, weights) -> dict:
        """(B,) tensors on the device: every metric under the weights (B, N) float64."""
        torch, n = self.torch, weights.shape[1]
        values = {"acc": weights @ self.n_correct / self.n_entries}
        total = torch.zeros(weights.shape[0], dtype=torch.float64, device=self.device)
        for ref_is_pos, ref, query, below, at_or_below in self.auc_columns:
            cum = torch.nn.functional.pad(torch.cumsum(weights[:, ref], dim=1), (1, 0))
            w_query = weights[:, query]
            twice = (w_query * (cum[:, below] + cum[:, at_or_below])).sum(dim=1)
            n_ref, n_query = cum[:, -1], w_query.sum(dim=1)
            twice_u = 2 * n_ref * n_query - twice if ref_is_pos else twice
            area = twice_u / (2.0 * n_ref * n_query)
            total += torch.where((n_ref > 0) & (n_query > 0), area, float("nan"))
        values["auc"] = total / len(self.auc_columns)
        size = weights @ self.members
        recall = torch.where(size > 0, (weights @ self.hits) / size, float("nan"))
        values["balanced_acc"] = torch.stack(
            [torch.nanmean(recall[:, self.label_of == label], dim=1)
             for label in range(self.n_labels)]).mean(dim=0)
        sums = weights @ self.ece_terms  # (B, L * ECE_BINS)
        values["ece"] = (sums.abs().reshape(len(sums), -1, ECE_BINS).sum(dim=2).mean(dim=1) / n)
        values["brier"] = weights @ self.brier / n
        values["nll"] = weights @ self.nll / n
        return values


@functools.lru_cache(maxsize=2)
def _device_weights(n: int, n_bootstrap: int, seed: int, device: str) -> tuple:
    """The resamples of `_resample_indices` as float64 count matrices on `device`,
    BOOTSTRAP_DEVICE_CHUNK resamples each, made once per (n, n_bootstrap, seed, device): every
    row of a store is scored on the same test split with seed 0, so they share them."""
    import torch  # only for metrics on a device: the numpy path never imports it

    resamples, weights = _resample_indices(n, n_bootstrap, seed), []
    while True:
        chunks = [c for _, c in zip(range(BOOTSTRAP_DEVICE_CHUNK // BOOTSTRAP_CHUNK), resamples,
                                    strict=False)]
        if not chunks:
            return tuple(weights)
        counts = _counts(np.concatenate(chunks), n).astype(np.int32)
        weights.append(torch.as_tensor(counts, device=device).double())


def _evaluate_on_device(y_true, y_score, task, device, n_bootstrap: int, seed: int, ci: float
                        ) -> dict[str, tuple[float, tuple[float, float]]]:
    """`bootstrap_metrics` for every metric with the products on `device` (the same resamples,
    drawn by the same generator on the host, uploaded once: `_device_weights`)."""
    import torch  # only for metrics on a device: the numpy path never imports it

    scorers = _DeviceScorers(y_true, y_score, task, device)
    n = np.asarray(y_true).shape[0]
    chunks = [scorers(weights)
              for weights in _device_weights(n, n_bootstrap, seed, str(scorers.device))]
    point = scorers(torch.ones((1, n), dtype=torch.float64, device=scorers.device))
    # (metrics, 1 + resamples) on the device, then one copy to the host
    table = torch.stack([torch.cat([point[name], *(c[name] for c in chunks)])
                         for name in METRIC_NAMES]).cpu().numpy()
    return {name: (float(row[0]), _percentile_interval(row[1:], ci))
            for name, row in zip(METRIC_NAMES, table, strict=True)}


def evaluate(
    y_true: np.ndarray,
    y_score: np.ndarray,
    task: Task,
    *,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    ci: float = DEFAULT_CI,
    device: str | None = None,
) -> Metrics:
    """Every metric of the module docstring with its bootstrap CI (the same resamples for all).

    `device` (e.g. "cuda") computes the resampled metrics with torch there: the same resamples,
    the same values to rounding (intervals within 1e-9 of the numpy path, tests/test_metrics.py).
    """
    _check_bootstrap(n_bootstrap, ci)
    scored = (bootstrap_metrics(y_true, y_score, task, n_bootstrap=n_bootstrap, seed=seed, ci=ci)
              if device is None else
              _evaluate_on_device(y_true, y_score, task, device, n_bootstrap, seed, ci))
    return Metrics(
        **{name: point for name, (point, _) in scored.items()},
        **{f"{name}_ci": interval for name, (_, interval) in scored.items()},
    )
