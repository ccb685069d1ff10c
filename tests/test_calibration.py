"""Calibration metrics (ECE, Brier, NLL) and their bootstrap CIs; reliability bins.

Run: .venv/bin/python -m pytest tests/test_calibration.py -q

ECE is checked against cases computed by hand; Brier and NLL against scikit-learn's
`brier_score_loss` / `log_loss` on the probabilities of classifiers fitted to real data
(scikit-learn's bundled breast-cancer and digits sets); the vectorised CIs against re-indexing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, log_loss
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medfm.data import Task
from medfm.metrics import (
    ECE_BINS,
    NLL_CLIP,
    balanced_acc,
    bootstrap_ci,
    bootstrap_metrics,
    brier,
    ece,
    evaluate,
    nll,
    reliability_bins,
)

N_BOOTSTRAP = 100


def _fitted_scores(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """(y_true (N, 1) or (N, L), test probabilities) of a logistic regression on real data."""
    if task is Task.BINARY:
        x, y = load_breast_cancer(return_X_y=True)
    else:
        x, y = load_digits(return_X_y=True)
    if task is Task.MULTI_LABEL:  # two labels per digit: "at least 5" and "even"
        y = np.stack([y >= 5, y % 2 == 0], axis=1).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.4, random_state=0)
    # a weak C keeps the probabilities away from 0 and 1, so no clipping rule matters
    def fit(target):
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000)).fit(
            x_train, target)
    if task is Task.MULTI_LABEL:
        scores = np.stack([fit(y_train[:, j]).predict_proba(x_test)[:, 1] for j in range(2)], 1)
        return y_test, scores
    return y_test[:, None], fit(y_train).predict_proba(x_test)


def test_ece_binary_by_hand():
    # P(class 1), labels; prediction p > 0.5, confidence max(p, 1 - p):
    # conf   0.95 0.85 0.75 0.62 0.95 0.58   correct 1 0 1 1 1 0
    # bins (of 15): 14, 12, 11, 9, 14, 8 -> |2 - 1.9| + .85 + .25 + .38 + .58 = 2.16 over 6
    p = np.array([0.95, 0.85, 0.25, 0.62, 0.05, 0.58])
    y = np.array([[1], [0], [0], [1], [0], [0]])
    assert ece(y, p, Task.BINARY) == pytest.approx(2.16 / 6, abs=1e-12)
    assert ece(y, np.stack([1 - p, p], 1), Task.BINARY) == pytest.approx(0.36, abs=1e-12)


def test_ece_multiclass_by_hand_and_equal_width_bins():
    # rows 0 and 1 share bin 10 (conf 0.7): one right, one wrong -> |1 - 1.4| = 0.4;
    # row 2 conf 0.82 right (bin 12) -> 0.18; row 3 conf 0.45 right (bin 6) -> 0.55
    s = np.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.08, 0.1, 0.82], [0.45, 0.35, 0.2]])
    y = np.array([[0], [1], [2], [0]])
    assert ece(y, s, Task.MULTI_CLASS) == pytest.approx((0.4 + 0.18 + 0.55) / 4, abs=1e-12)
    assert ece(y, s, Task.ORDINAL) == ece(y, s, Task.MULTI_CLASS)
    bins = reliability_bins(y, s, Task.MULTI_CLASS)
    assert ECE_BINS == 15 and list(np.flatnonzero(bins.count)) == [6, 10, 12]
    assert bins.accuracy[10] == 0.5 and bins.confidence[10] == pytest.approx(0.7)
    np.testing.assert_allclose(bins.edges, np.arange(16) / 15)
    # a perfectly calibrated bin: 7 of 10 right at confidence 0.7 -> ECE 0
    y = np.array([[0]] * 7 + [[1]] * 3)
    assert ece(y, np.tile([0.7, 0.3], (10, 1)), Task.MULTI_CLASS) == pytest.approx(0, abs=1e-12)


def test_ece_multilabel_is_mean_of_binary_ece_per_label():
    y, s = _fitted_scores(Task.MULTI_LABEL)
    per_label = [ece(y[:, j], s[:, j], Task.BINARY) for j in range(y.shape[1])]
    assert ece(y, s, Task.MULTI_LABEL) == pytest.approx(np.mean(per_label), abs=1e-12)
    assert min(per_label) > 0  # real scores are not perfectly calibrated


@pytest.mark.parametrize("task", [Task.BINARY, Task.MULTI_CLASS])
def test_brier_and_nll_equal_sklearn_on_real_scores(task):
    y, s = _fitted_scores(task)
    labels = list(range(s.shape[1]))
    expected_brier = (brier_score_loss(y[:, 0], s[:, 1]) if task is Task.BINARY
                      else brier_score_loss(y[:, 0], s, labels=labels))
    assert brier(y, s, task) == pytest.approx(expected_brier, rel=1e-12)
    assert nll(y, s, task) == pytest.approx(log_loss(y[:, 0], s, labels=labels), rel=1e-12)
    m = evaluate(y, s, task, n_bootstrap=N_BOOTSTRAP)
    assert (m.brier, m.nll, m.ece) == (pytest.approx(brier(y, s, task), rel=1e-12),
                                       pytest.approx(nll(y, s, task), rel=1e-12),
                                       pytest.approx(ece(y, s, task), abs=1e-12))


def test_multilabel_brier_and_nll_are_means_over_labels_of_sklearn():
    y, s = _fitted_scores(Task.MULTI_LABEL)
    assert brier(y, s, Task.MULTI_LABEL) == pytest.approx(
        np.mean([brier_score_loss(y[:, j], s[:, j]) for j in range(2)]), rel=1e-12)
    assert nll(y, s, Task.MULTI_LABEL) == pytest.approx(
        np.mean([log_loss(y[:, j], s[:, j], labels=[0, 1]) for j in range(2)]), rel=1e-12)


def test_nll_clips_certain_mistakes():
    y = np.array([[1], [0]])
    s = np.array([[1.0, 0.0], [1.0, 0.0]])  # the first is certain and wrong
    assert nll(y, s, Task.MULTI_CLASS) == pytest.approx(-np.log(NLL_CLIP) / 2)
    assert nll(y, s, Task.BINARY) == pytest.approx(-np.log(NLL_CLIP) / 2, rel=1e-6)
    assert brier(y, s, Task.MULTI_CLASS) == pytest.approx(1.0)  # (1 + 1) / 2 samples
    assert brier(y, s, Task.BINARY) == pytest.approx(0.5)  # on P(class 1): half the sum


@pytest.mark.parametrize("task", [Task.BINARY, Task.MULTI_CLASS, Task.MULTI_LABEL])
def test_vectorised_cis_equal_resampling_the_data(task):
    y, s = _fitted_scores(task)
    m = evaluate(y, s, task, n_bootstrap=N_BOOTSTRAP, seed=4)
    for name, fn in (("ece", ece), ("brier", brier), ("nll", nll),
                     ("balanced_acc", balanced_acc)):
        expected = bootstrap_ci(y, s, lambda t, p, fn=fn: fn(t, p, task),
                                n_bootstrap=N_BOOTSTRAP, seed=4)
        np.testing.assert_allclose(getattr(m, f"{name}_ci"), expected, rtol=0, atol=1e-12)
        low, high = getattr(m, f"{name}_ci")
        assert low <= getattr(m, name) <= high and low < high, name


def test_a_subset_of_metrics_gives_the_same_numbers():
    y, s = _fitted_scores(Task.MULTI_CLASS)
    m = evaluate(y, s, Task.MULTI_CLASS, n_bootstrap=N_BOOTSTRAP)
    part = bootstrap_metrics(y, s, Task.MULTI_CLASS, ("ece", "nll"), n_bootstrap=N_BOOTSTRAP)
    assert part == {"ece": (m.ece, m.ece_ci), "nll": (m.nll, m.nll_ci)}


def test_calibration_metrics_rank_tempered_scores():
    """Same predictions, three temperatures: the weak-C probe is underconfident (p ** 1),
    p ** 4 is close to calibrated, p ** 50 is overconfident; ACC cannot tell them apart."""
    y, s = _fitted_scores(Task.MULTI_CLASS)
    tempered = (s ** k / (s ** k).sum(axis=1, keepdims=True) for k in (1, 4, 50))
    under, fair, over = (evaluate(y, p, Task.MULTI_CLASS, n_bootstrap=N_BOOTSTRAP)
                         for p in tempered)
    assert under.acc == fair.acc == over.acc
    assert fair.ece < min(under.ece, over.ece) and fair.ece_ci[1] < under.ece_ci[0]
    assert fair.brier < min(under.brier, over.brier)
    assert fair.nll < under.nll < over.nll
    top = reliability_bins(y, s ** 50 / (s ** 50).sum(axis=1, keepdims=True), Task.MULTI_CLASS)
    assert top.count[-1] > 0.9 * len(y) and top.accuracy[-1] < top.confidence[-1]


# -- in the report: calibration tables and reliability diagrams ------------------------------


@pytest.fixture(scope="module")
def calibrated_report(tmp_path_factory):
    """A registry built through the API with real score arrays (tests/test_report.py's
    MODELS: resnet_a logreg calibrated, vit_b logreg and the fine-tune overconfident)."""
    from medfm.report import report
    from tests.test_report import build_scored_registry

    workdir = tmp_path_factory.mktemp("calibrated") / "work"
    registry = build_scored_registry(workdir, corrupted=False)
    return registry, report(workdir=workdir)


def _seed_mean(registry, backbone: str, method: str, field: str) -> float:
    return float(np.mean([getattr(r, field) for r in registry.query(backbone=backbone,
                                                                     method=method)]))


def test_calibration_tables_hold_seed_means_and_cis_lowest_bold(calibrated_report):
    registry, files = calibrated_report
    md = (files.out / "tables" / "calibration_ece.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| breastmnist | 28 |"))
    mean, low, high = (_seed_mean(registry, "resnet_a", "logreg", f) * 100
                       for f in ("ece", "ece_ci_low", "ece_ci_high"))
    assert f"**{mean:.1f} [{low:.1f}, {high:.1f}]**" in row  # calibrated: lowest ECE, bold
    assert row.count("**") == 2
    for metric in ("brier", "nll"):
        text = (files.out / "tables" / f"calibration_{metric}.md").read_text()
        mean = _seed_mean(registry, "vit_b", "logreg", metric)
        assert f"{mean:.3f} [" in text
        assert (files.out / "tables" / f"calibration_{metric}.tex").read_text().count(
            r"\textbf{") == 1
    summary = pd.read_csv(files.out / "tables" / "summary.csv")
    logreg = summary[summary["variant"] == "vit_b · logreg"].iloc[0]
    assert logreg["nll_mean"] == pytest.approx(_seed_mean(registry, "vit_b", "logreg", "nll"))
    assert logreg["ece_ci_high"] == pytest.approx(
        _seed_mean(registry, "vit_b", "logreg", "ece_ci_high"))
    assert "Calibration" in files.html.read_text()


def test_reliability_diagram_is_drawn_from_stored_scores(calibrated_report, monkeypatch,
                                                         tmp_path):
    import matplotlib.image

    from medfm.report import plots, report

    registry, files = calibrated_report
    path = files.out / "plots" / "reliability_breastmnist_28.png"
    assert path in files.plots and path.stat().st_size > 5_000
    pixels = matplotlib.image.imread(path)[..., :3]
    assert (np.abs(pixels - pixels[0, 0]).sum(axis=-1) > 0.05).mean() > 0.01

    drawn, draw = [], plots.reliability_diagram
    monkeypatch.setattr(plots, "reliability_diagram",
                        lambda curves, title, out: drawn.append(curves) or draw(curves, title, out))
    report(workdir=registry.path.parent, out=tmp_path / "again")
    (curves,) = drawn
    assert [label.split(":")[0] for label, _, _ in curves] == ["probe", "fine-tune"]
    (probe_label, probe_bins, probe_ece), (_, tuned_bins, tuned_ece) = curves
    assert "resnet_a · logreg" in probe_label  # the best probe by AUC
    # both seeds' stored test scores, pooled
    scores = [registry.scores(r.key) for r in registry.query(backbone="resnet_a",
                                                             method="logreg")]
    y_true = np.concatenate([t for t, _ in scores])
    y_score = np.concatenate([s for _, s in scores])
    assert probe_bins.count.sum() == len(y_true) == 2 * 400
    assert probe_ece == pytest.approx(ece(y_true, y_score, Task.BINARY))
    # overconfident fine-tune: its accuracy falls short of its confidence in the top bins
    filled = tuned_bins.count > 0
    assert (tuned_bins.accuracy[filled] <= tuned_bins.confidence[filled] + 0.02).mean() > 0.7
    assert tuned_ece > probe_ece
