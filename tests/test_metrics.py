
import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC
from sklearn.metrics import balanced_accuracy_score

from medfm.data import Task
from medfm.errors import InvalidArgumentError
from medfm.metrics import Metrics, acc, auc, balanced_acc, bootstrap_ci, evaluate


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _case(kind: str, n: int = 400, seed: int = 0, ties: bool = False):
    """(y_true as in the npz, y_score, task) with scores that carry signal about the labels."""
    rng = np.random.default_rng(seed)
    if kind == "multi-label":
        y = (rng.random((n, 14)) < np.linspace(0.05, 0.4, 14)).astype(np.uint8)
        s = 1 / (1 + np.exp(-(1.5 * y + rng.normal(size=y.shape) - 1.5)))
        task = Task.MULTI_LABEL
    else:
        k = {"binary2": 2, "binary1": 2, "binary0": 2, "multi-class": 9, "ordinal": 5}[kind]
        y = rng.integers(0, k, size=(n, 1)).astype(np.uint8)
        s = _softmax(1.2 * np.eye(k)[y[:, 0]] + rng.normal(size=(n, k)))
        task = {"multi-class": Task.MULTI_CLASS, "ordinal": Task.ORDINAL}.get(kind, Task.BINARY)
        if kind == "binary1":
            s = s[:, 1:]  # (N, 1): P(class 1)
        elif kind == "binary0":
            s = s[:, 1]  # (N,): P(class 1)
    if ties:
        s = np.round(s, 1)  # many tied scores: the trapezoid's half-credit case
    return y, s, task


KINDS = ["binary2", "binary1", "binary0", "multi-class", "ordinal", "multi-label"]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_auc_and_acc_equal_medmnist_evaluator(kind, ties):
    y, s, task = _case(kind, ties=ties)
    assert abs(auc(y, s, task) - getAUC(y, s, task.value)) < 1e-12
    assert abs(acc(y, s, task) - getACC(y, s, task.value)) < 1e-12
    assert abs(acc(y, s, task, threshold=0.3) - getACC(y, s, task.value, 0.3)) < 1e-12
    m = evaluate(y, s, task, n_bootstrap=20)
    assert abs(m.auc - getAUC(y, s, task.value)) < 1e-12
    assert abs(m.acc - getACC(y, s, task.value)) < 1e-12


def test_chestmnist_style_all_negative_model_has_high_acc_but_chance_auc():
    rng = np.random.default_rng(0)
    y = (rng.random((2000, 14)) < 0.053).astype(np.uint8)
    s = np.full(y.shape, 0.01)
    assert acc(y, s, Task.MULTI_LABEL) > 0.94
    assert auc(y, s, Task.MULTI_LABEL) == pytest.approx(0.5)
    assert balanced_acc(y, s, Task.MULTI_LABEL) == pytest.approx(0.5)


def test_balanced_accuracy_hand_examples():
    # binary: all predicted 0 -> ACC 3/4, balanced (1 + 0) / 2
    y = np.array([[0], [0], [0], [1]])
    s = np.array([[0.9, 0.1]] * 4)
    assert acc(y, s, Task.BINARY) == 0.75
    assert balanced_acc(y, s, Task.BINARY) == 0.5
    # multi-class: recalls 1/2, 1, 0 -> 1/2; class 2 absent from predictions still counts
    y = np.array([[0], [0], [1], [2]])
    s = np.eye(3)[[0, 1, 1, 1]]
    assert balanced_acc(y, s, Task.MULTI_CLASS) == pytest.approx(0.5)
    # multi-label: label 0 recalls (1, 1/2) -> 3/4; label 1 has no positives: recall of 0 is 1
    y = np.array([[1, 0], [0, 0], [0, 0]])
    s = np.array([[0.7, 0.2], [0.6, 0.1], [0.2, 0.1]])
    assert balanced_acc(y, s, Task.MULTI_LABEL) == pytest.approx((0.75 + 1.0) / 2)


@pytest.mark.parametrize("kind", ["binary2", "multi-class", "ordinal"])
def test_balanced_accuracy_matches_sklearn(kind):
    y, s, task = _case(kind)
    pred = s[:, -1] > 0.5 if task is Task.BINARY else s.argmax(axis=1)
    assert balanced_acc(y, s, task) == pytest.approx(balanced_accuracy_score(y[:, 0], pred))


@pytest.mark.parametrize("kind", ["binary2", "multi-class", "multi-label"])
def test_vectorised_cis_equal_resampling_the_data(kind):
    y, s, task = _case(kind, n=150, ties=True)
    m = evaluate(y, s, task, n_bootstrap=100, seed=3)
    acc_ci = bootstrap_ci(y, s, lambda t, p: acc(t, p, task), n_bootstrap=100, seed=3)
    auc_ci = bootstrap_ci(y, s, lambda t, p: auc(t, p, task), n_bootstrap=100, seed=3)
    np.testing.assert_allclose(m.acc_ci, acc_ci, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.auc_ci, auc_ci, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["binary2", "multi-class", "multi-label"])
def test_ci_contains_point_estimate_and_narrows_with_more_samples(kind):
    small = evaluate(*_case(kind, n=200), n_bootstrap=300)
    large = evaluate(*_case(kind, n=5000), n_bootstrap=300)
    for m in (small, large):
        assert m.acc_ci[0] <= m.acc <= m.acc_ci[1]
        assert m.auc_ci[0] <= m.auc <= m.auc_ci[1]
    for name in ("acc_ci", "auc_ci"):
        small_width = np.diff(getattr(small, name))[0]
        assert np.diff(getattr(large, name))[0] < 0.5 * small_width


def test_resamples_without_a_class_are_skipped():
    # one positive in 20: ~36% of resamples miss it, and their AUC is undefined
    y = np.zeros((20, 1), dtype=np.uint8)
    y[7] = 1
    s = np.linspace(0.0, 1.0, 20)
    m = evaluate(y, s, Task.BINARY, n_bootstrap=200)
    assert np.isfinite(m.auc_ci).all()
    assert m.auc_ci == bootstrap_ci(y, s, lambda t, p: auc(t, p, Task.BINARY), n_bootstrap=200)
    one_class = np.zeros((20, 1), dtype=np.uint8)
    assert np.isnan(auc(one_class, s, Task.BINARY))
    assert np.isnan(evaluate(one_class, s, Task.BINARY, n_bootstrap=10).auc_ci).all()


@pytest.mark.parametrize("kind", ["binary2", "multi-class", "multi-label"])
def test_bootstrap_auc_interval_is_scikit_learns_per_resample(kind):
    """The vectorised resample AUCs (weights summed into reference positions, one sparse
    product) are, resample by resample, scikit-learn's ROC-AUC of the resampled test set
    (mean over columns; resamples missing a class skipped), ties included."""
    from sklearn.metrics import roc_auc_score

    from medfm.metrics import _percentile_interval, _resample_indices

    y, s, task = _case(kind, n=120, seed=3, ties=True)
    columns = ([(y[:, j], s[:, j]) for j in range(y.shape[1])] if task is Task.MULTI_LABEL
               else [(y[:, 0], s[:, 1])] if task is Task.BINARY
               else [(y[:, 0] == c, s[:, c]) for c in range(s.shape[1])])
    values = []
    for chunk in _resample_indices(len(y), 200, 0):
        for rows in chunk:
            if any(len(np.unique(t[rows])) < 2 for t, _ in columns):
                values.append(np.nan)
                continue
            values.append(np.mean([roc_auc_score(t[rows], p[rows]) for t, p in columns]))
    expected = _percentile_interval(values, 0.95)
    np.testing.assert_allclose(evaluate(y, s, task, n_bootstrap=200).auc_ci, expected,
                               rtol=1e-12)


def test_bootstrap_is_seeded():
    y, s, task = _case("multi-class")
    first = evaluate(y, s, task, n_bootstrap=50, seed=1)
    assert evaluate(y, s, task, n_bootstrap=50, seed=1) == first
    assert evaluate(y, s, task, n_bootstrap=50, seed=2).auc_ci != first.auc_ci


def test_thousand_resamples_of_20k_samples_bracket_the_estimate():
    y, s, task = _case("binary2", n=20_000)
    m = evaluate(y, s, task, n_bootstrap=1000)
    assert isinstance(m, Metrics) and m.auc_ci[0] < m.auc < m.auc_ci[1]
    assert m.auc_ci[1] - m.auc_ci[0] < 0.05  # 20k samples: a narrow interval


@pytest.mark.parametrize(
    "y_shape, s_shape, task",
    [
        ((10, 1), (9, 2), Task.BINARY),  # row count differs
        ((10, 1), (10, 3), Task.BINARY),  # binary with three columns
        ((10, 14), (10, 13), Task.MULTI_LABEL),  # label count differs
        ((10, 1), (10,), Task.MULTI_CLASS),  # multi-class needs a column per class
    ],
)
def test_bad_shapes_raise_a_user_error(y_shape, s_shape, task):
    with pytest.raises(InvalidArgumentError):
        auc(np.zeros(y_shape, dtype=np.uint8), np.full(s_shape, 0.5), task)


def test_bad_bootstrap_settings_raise_a_user_error():
    y, s, task = _case("binary2", n=20)
    with pytest.raises(InvalidArgumentError, match="n_bootstrap"):
        evaluate(y, s, task, n_bootstrap=0)
    with pytest.raises(InvalidArgumentError, match="ci"):
        evaluate(y, s, task, ci=95)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_device_metrics_equal_the_numpy_metrics(kind, ties, device):
    """evaluate(device=...) computes the resampled metrics with torch on the device: every point
    estimate and every 1,000-resample interval equals the numpy path's to 1e-9 (the same
    resamples), ties, multi-label and a resample missing a class included."""
    y, s, task = _case(kind, n=600, seed=5, ties=ties)
    host = evaluate(y, s, task, seed=2)
    on_device = evaluate(y, s, task, seed=2, device=device)
    for name in Metrics.__dataclass_fields__:
        np.testing.assert_allclose(getattr(on_device, name), getattr(host, name), rtol=0,
                                   atol=1e-9, err_msg=name)
    rare = np.zeros((30, 1), dtype=np.uint8)
    rare[3] = 1  # a third of the resamples miss the one positive: their AUC is skipped
    score = np.linspace(0.0, 1.0, 30)
    assert (evaluate(rare, score, Task.BINARY, device=device).auc_ci
            == pytest.approx(evaluate(rare, score, Task.BINARY).auc_ci, abs=1e-12))
