"""The probe stage: estimator contract, solver parity, C selection, kNN, the method registry,
probe() end to end."""

from __future__ import annotations

import json

import joblib
import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC
from sklearn.base import clone

from medfm.data import Task, get_dataset
from medfm.errors import InvalidArgumentError, StoreError
from medfm.metrics import auc
from medfm.resolve.defaults import C_GRID
from medfm.probe import KNNProbe, LogisticProbe, probe, probe_methods
from medfm.probe.methods import get_method
from medfm.probe.methods.logreg import LOSS_MARGIN, PATIENCE
from medfm.probe.solvers import cuml_available, make_solver, resolve_solver
from medfm.store.registry import Registry
from medfm.synthetic import write_feature_store

DIM = 24  # synthetic feature width


def _blobs(task: Task, n: int, seed: int, n_classes: int = 3, dim: int = DIM):
    """Overlapping Gaussian classes (or labels driven by feature directions): (X, y)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(n_classes, dim)) * 0.6
    if task is Task.MULTI_LABEL:
        X = rng.normal(size=(n, dim)).astype(np.float32)
        y = (X[:, :n_classes] + rng.normal(size=(n, n_classes)) > 0.7).astype(np.int64)
        return X, y
    y = rng.integers(0, n_classes, size=n)
    X = (centers[y] + rng.normal(size=(n, dim))).astype(np.float32)
    return X, y


CASES = {Task.BINARY: 2, Task.MULTI_CLASS: 4, Task.MULTI_LABEL: 3}


def _noisy(n: int, seed: int, n_classes: int = 3, dim: int = 60):
    """Classes that overlap (label noise): the val loss falls, then rises as C overfits."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    return X, np.argmax(2 * X[:, :n_classes] + rng.normal(size=(n, n_classes)), axis=1)


@pytest.mark.parametrize("task", list(CASES))
def test_torch_matches_sklearn_on_the_same_C(task):
    X, y = _blobs(task, 1200, 0, CASES[task])
    Xv, yv = _blobs(task, 300, 1, CASES[task])
    Xt, yt = _blobs(task, 800, 2, CASES[task])
    fitted = {b: LogisticProbe(solver=b).fit(X, y, Xv, yv) for b in ("sklearn", "torch")}
    sk, th = fitted["sklearn"], fitted["torch"]
    assert sk.C_ == th.C_
    assert np.mean(sk.predict(Xt) == th.predict(Xt)) >= 0.99
    assert abs(auc(yt, sk.predict_proba(Xt), task) - auc(yt, th.predict_proba(Xt), task)) < 0.005
    assert all(step["converged"] for step in th.path_)


def test_solver_objective_is_sklearns():
    """At a fixed C the torch minimizer equals scikit-learn's coefficients."""
    X, y = _blobs(Task.MULTI_CLASS, 600, 3, 3)
    X = (X - X.mean(0)) / X.std(0)
    sk = make_solver("sklearn", X, y, "multinomial", tol=1e-6, max_iter=500).fit(0.05)
    th = make_solver("torch", X, y, "multinomial", tol=1e-6, max_iter=500).fit(0.05)
    # multinomial weights are defined up to a per-feature shift across classes; compare centred
    centre = lambda W: W - W.mean(axis=0)  # noqa: E731
    np.testing.assert_allclose(centre(th.coef), centre(sk.coef), atol=2e-3)


@pytest.mark.parametrize("kind", ["multinomial", "binary"])
def test_torch_solver_steps_exactly_as_torch_optim_lbfgs(kind):
    """medfm.probe.lbfgs is torch.optim.LBFGS's step as a function: the same iterates bit for
    bit along a warm-started C path, and no torch._dynamo import (which any torch Optimizer
    triggers) in a fresh process."""
    import subprocess
    import sys

    import torch

    X, y = _blobs(Task.MULTI_CLASS if kind == "multinomial" else Task.BINARY, 500, 2,
                  3 if kind == "multinomial" else 2)
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    Y = y if kind == "multinomial" else y.reshape(-1, 1).astype(np.float64)
    solver = make_solver("torch", X, Y, kind, tol=1e-4, max_iter=100)
    W, b = solver.W.clone(), solver.b.clone()
    for C in (1e-3, 1e-1, 10.0):
        ours = solver.fit(C)
        optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=100, max_eval=400,
                                      tolerance_grad=1e-4, tolerance_change=0.0,
                                      history_size=10, line_search_fn="strong_wolfe")

        def closure(C=C):
            loss, W.grad, b.grad = solver._objective(W, b, C)
            return loss.item()

        optimizer.step(closure)
        assert ours.n_iter == optimizer.state[W]["n_iter"] > 0
        assert np.array_equal(ours.coef, W.detach().T.double().numpy())
        assert np.array_equal(ours.intercept, b.detach().double().numpy())
    code = ("import sys, numpy as np; from medfm.probe.solvers import make_solver; "
            "X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32); "
            "make_solver('torch', X, (X[:, 0] > 0).astype(int), 'multinomial', tol=1e-4, "
            "max_iter=50).fit(1.0); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_estimator_contract_clone_and_joblib(tmp_path):
    X, y = _blobs(Task.MULTI_CLASS, 400, 0, 3)
    Xv, yv = _blobs(Task.MULTI_CLASS, 100, 1, 3)
    probe_ = LogisticProbe(solver="torch", Cs=(0.01, 0.1))
    twin = clone(probe_)
    assert twin.get_params() == probe_.get_params() and not hasattr(twin, "coef_")
    probe_.fit(X, y, Xv, yv)
    assert probe_.coef_.shape == (3, DIM) and probe_.intercept_.shape == (3,)
    assert probe_.mean_.shape == probe_.scale_.shape == (DIM,)
    assert [p["C"] for p in probe_.path_] == [0.01, 0.1] and probe_.C_ in (0.01, 0.1)
    joblib.dump(probe_, tmp_path / "probe.joblib")
    loaded = joblib.load(tmp_path / "probe.joblib")
    np.testing.assert_array_equal(loaded.predict_proba(X), probe_.predict_proba(X))
    assert probe_.score(X, y) == np.mean(probe_.predict(X) == y)


def test_binary_proba_has_two_columns_and_original_class_ids():
    X, y = _blobs(Task.BINARY, 300, 0, 2)
    fitted = LogisticProbe(Cs=(1.0,), solver="sklearn").fit(X, y + 5)
    proba = fitted.predict_proba(X)
    assert proba.shape == (300, 2) and np.allclose(proba.sum(1), 1)
    assert set(fitted.predict(X)) <= {5, 6} and fitted.coef_.shape == (1, DIM)


def _loss_rule(path: list[dict], margin: float = LOSS_MARGIN) -> int:
    """The index the loss rule should choose on a walked path (logreg module docstring)."""
    best = 0
    for i, step in enumerate(path):
        if step["loss"] < path[best]["loss"] * (1 - margin):
            best = i
    return best


def test_C_is_chosen_by_val_loss_by_default():
    """The default rule: a weaker C replaces the best only if it lowers the val log-loss by
    more than LOSS_MARGIN; the path records the val loss and ACC, and C_ is the rule's pick."""
    X, y = _noisy(150, 0)
    Xv, yv = _noisy(400, 1)
    fitted = LogisticProbe(solver="torch", patience=None).fit(X, y, Xv, yv)
    assert (fitted.select_by, fitted.select_metric_) == ("loss", "loss")
    losses = [p["loss"] for p in fitted.path_]
    assert len(losses) == len(C_GRID) and len(set(losses)) > 1
    assert fitted.C_ == C_GRID[_loss_rule(fitted.path_)]
    assert fitted.C_ != C_GRID[int(np.argmax([p["acc"] for p in fitted.path_]))]  # not by ACC
    proba = fitted.predict_proba(Xv)  # the model kept is the one scored at C_
    nll = -np.mean(np.log(proba[np.arange(len(yv)), yv]))
    assert nll == pytest.approx(losses[C_GRID.index(fitted.C_)], rel=1e-6)


def test_the_margin_keeps_the_stronger_C_when_a_weaker_one_gains_little():
    X, y = _blobs(Task.BINARY, 1200, 0, 2)
    Xv, yv = _blobs(Task.BINARY, 300, 1, 2)
    plain = LogisticProbe(solver="sklearn", loss_margin=0.0, patience=None).fit(X, y, Xv, yv)
    margin = LogisticProbe(solver="sklearn", patience=None).fit(X, y, Xv, yv)
    losses = [p["loss"] for p in plain.path_]
    assert plain.C_ == C_GRID[int(np.argmin(losses))]
    # the weak-regularization plateau: the lowest loss is less than LOSS_MARGIN below the
    # margin rule's choice, which is the strongest C within reach of it
    chosen = C_GRID.index(margin.C_)
    assert margin.C_ < plain.C_ and losses[chosen] * (1 - LOSS_MARGIN) <= min(losses)


def test_the_old_rule_is_still_selectable():
    """select_by="primary": the first C with the best val ACC over the whole grid (the rule of
    registry rows with select_metric "acc"); params without select_by (such rows) mean it."""
    X, y = _noisy(150, 0)
    Xv, yv = _noisy(400, 1)
    fitted = LogisticProbe(solver="torch", select_by="primary").fit(X, y, Xv, yv)
    accs = [p["acc"] for p in fitted.path_]
    assert len(accs) == len(C_GRID) and fitted.select_metric_ == "acc"  # never stopped early
    assert fitted.C_ == C_GRID[int(np.argmax(accs))] and len(set(accs)) > 1
    refit = LogisticProbe(solver="torch", Cs=(fitted.C_,)).fit(X, y)
    assert np.mean(refit.predict(Xv) == yv) == pytest.approx(max(accs))
    old_params = {"C_grid": list(C_GRID), "max_iter": 100, "tol": 1e-4,
                  "standardize": "train-subset"}  # what rows fitted before issue 12 record
    features = {"train": X, "val": Xv, "test": Xv}
    old = get_method("logreg").fit(features, {"train": y, "val": yv}, Task.MULTI_CLASS,
                                   np.arange(len(y)), params=old_params, selection="val",
                                   seed=0, solver="torch", device=None)
    assert old.chosen_C == fitted.C_ and len(old.extra["path"]) == len(C_GRID)
    with pytest.raises(InvalidArgumentError, match="selection rule"):
        LogisticProbe(select_by="auc").fit(X, y, Xv, yv)


def test_the_walk_stops_once_the_loss_has_turned_and_keeps_its_choice():
    """patience=PATIENCE stops after that many C values that do not replace the best; the walk
    up to there is the whole walk's, so the choice and the model are the same."""
    X, y = _noisy(150, 0)
    Xv, yv = _noisy(400, 1)
    whole = LogisticProbe(solver="sklearn", patience=None).fit(X, y, Xv, yv)
    stopped = LogisticProbe(solver="sklearn").fit(X, y, Xv, yv)
    best = C_GRID.index(whole.C_)
    assert len(stopped.path_) == best + 1 + PATIENCE < len(C_GRID)
    assert stopped.path_ == whole.path_[:len(stopped.path_)] and stopped.C_ == whole.C_
    np.testing.assert_array_equal(stopped.predict_proba(Xv), whole.predict_proba(Xv))


def test_holdout_selection_needs_no_val_and_ignores_it():
    X, y = _blobs(Task.MULTI_CLASS, 200, 0, 3)
    fitted = LogisticProbe(solver="torch", selection="holdout", random_state=1).fit(X, y)
    garbage_val = np.full((5, DIM), np.nan, dtype=np.float32)  # never read
    same = LogisticProbe(solver="torch", selection="holdout", random_state=1).fit(
        X, y, garbage_val, np.zeros(5))
    np.testing.assert_array_equal(fitted.predict_proba(X), same.predict_proba(X))
    assert np.isfinite([p["loss"] for p in fitted.path_]).all()
    np.testing.assert_allclose(fitted.mean_, X.mean(0), rtol=1e-5, atol=1e-6)  # refit on all


def test_val_selection_without_val_is_a_clear_error():
    X, y = _blobs(Task.BINARY, 50, 0, 2)
    with pytest.raises(InvalidArgumentError, match="X_val"):
        LogisticProbe().fit(X, y)


def test_multilabel_constant_label_gets_a_constant_probe():
    X, y = _blobs(Task.MULTI_LABEL, 300, 0, 3)
    y[:, 1] = 0
    fitted = LogisticProbe(Cs=(0.1,), solver="torch").fit(X, y)
    proba = fitted.predict_proba(X)
    assert proba.shape == (300, 3) and (proba[:, 1] < 1e-5).all()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_on_separable_data(metric):
    rng = np.random.default_rng(0)
    centers = np.eye(3, DIM, dtype=np.float32) * 10
    y = rng.integers(0, 3, 500)
    X = centers[y] + rng.normal(size=(500, DIM)).astype(np.float32)
    yt = rng.integers(0, 3, 200)
    Xt = centers[yt] + rng.normal(size=(200, DIM)).astype(np.float32)
    knn = KNNProbe(metric=metric).fit(X, y)
    proba = knn.predict_proba(Xt)
    assert proba.shape == (200, 3) and np.allclose(proba.sum(1), 1)
    assert knn.score(Xt, yt) == 1.0
    assert set(np.unique(proba * 11).round(6)) <= set(range(12))  # fractions of 11 votes


def test_knn_multilabel_is_the_mean_of_neighbour_labels():
    X = np.repeat(np.eye(2, 4, dtype=np.float32), 11, axis=0)
    y = np.zeros((22, 3), dtype=np.int64)
    y[:11, 0] = 1
    y[:5, 2] = 1
    proba = KNNProbe(k=11).fit(X, y).predict_proba(np.eye(2, 4, dtype=np.float32))
    np.testing.assert_allclose(proba, [[1, 0, 5 / 11], [0, 0, 0]], atol=1e-6)


@pytest.mark.skipif(not cuml_available(), reason="cuML does not import here (needs RAPIDS + GPU)")
def test_cuml_matches_sklearn_on_the_same_C():
    X, y = _blobs(Task.MULTI_CLASS, 1200, 0, 4)
    Xt, yt = _blobs(Task.MULTI_CLASS, 800, 2, 4)
    sk = LogisticProbe(solver="sklearn", Cs=(0.1,)).fit(X, y)
    cu = LogisticProbe(solver="cuml", Cs=(0.1,)).fit(X, y)
    assert np.mean(sk.predict(Xt) == cu.predict(Xt)) >= 0.99


# ---- probe() end to end on synthetic stores ------------------------------------------------

STORE_FLAGS = {"breastmnist": Task.BINARY, "bloodmnist": Task.MULTI_CLASS,
               "chestmnist": Task.MULTI_LABEL, "retinamnist": Task.ORDINAL}
STORE_ROWS = {"train": 240, "val": 80, "test": 120}


def write_store(workdir, flag: str, seed: int = 0) -> None:
    """A complete synthetic feature store for `flag`, features that carry the labels."""
    info = get_dataset(flag)
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(info.n_classes, DIM))
    features, labels = {}, {}
    for split, n in STORE_ROWS.items():
        if info.task is Task.MULTI_LABEL:
            y = (rng.random((n, info.n_classes)) < 0.3).astype(np.uint8)
            signal = y @ direction
        else:
            y = (np.arange(n) % info.n_classes).astype(np.uint8)[:, None]
            signal = direction[y[:, 0]]
        labels[split] = y
        features[split] = (signal + rng.normal(size=(n, DIM))).astype(np.float32)
    write_feature_store(workdir, flag, features, labels, backbone="synthetic_net.t")


def test_probe_every_task_writes_rows_then_a_rerun_computes_nothing(tmp_path, monkeypatch):
    work = tmp_path / "w"
    for i, flag in enumerate(STORE_FLAGS):
        write_store(work, flag, seed=i)
    report = probe(fractions=[0.5, 1.0], seeds=[0, 1], workdir=work, solver="torch",
                   progress=False)
    assert report.planned == len(STORE_FLAGS) * 4 and not report.skipped
    rows = Registry.in_workdir(work).query(method="logreg")
    assert {r.key.dataset for r in rows} == set(STORE_FLAGS) and len(rows) == 16
    for row in rows:
        assert row.key.backbone == "synthetic_net.t" and row.chosen_C is not None
        assert (row.solver, row.device) == ("torch", "cpu")
        assert row.auc > 0.75, (row.key.dataset, row.auc)
        assert row.acc_ci_low <= row.acc <= row.acc_ci_high
        assert row.key.select_metric == "loss"  # the default rule, in the key
        params = json.loads(row.key.params)
        assert (params["select_by"], params["loss_margin"], params["patience"]) == (
            "loss", LOSS_MARGIN, PATIENCE)
        assert 1 <= len(row.extra["path"]) <= len(params["C_grid"])
    half = [r for r in rows if r.key.dataset == "bloodmnist" and r.key.fraction == 0.5]
    assert half[0].subset_digest != half[1].subset_digest and half[0].n_train == 120
    full = [r for r in rows if r.key.dataset == "bloodmnist" and r.key.fraction == 1.0]
    assert full[1].extra["shared_fit"] == full[0].key.digest()  # same images, one fit

    def no_features(store):
        raise AssertionError(f"a rerun must not read features ({store.path})")

    monkeypatch.setattr("medfm.probe.run.StoreArrays.load", no_features)
    again = probe(fractions=[0.5, 1.0], seeds=[0, 1], workdir=work, solver="torch",
                  progress=False)
    assert not again.computed and len(again.skipped) == again.planned == 16
    monkeypatch.undo()

    forced = probe(dataset="breastmnist", fractions=[1.0], seeds=[0], workdir=work,
                   solver="torch", force=True, progress=False)
    assert len(forced.computed) == 1 and len(Registry.in_workdir(work)) == 16


@pytest.mark.parametrize("flag", list(STORE_FLAGS))
def test_saved_scores_reproduce_medmnist_metrics(tmp_path, flag):
    write_store(tmp_path, flag)
    report = probe(dataset=flag, fractions=[1.0], seeds=[0], workdir=tmp_path, method="knn",
                   progress=False)
    (row,) = report.computed
    y_true, y_score = Registry.in_workdir(tmp_path).scores(row.key)
    task = STORE_FLAGS[flag].value
    assert row.acc == getACC(y_true, y_score, task)
    assert row.auc == getAUC(y_true, y_score, task)
    assert row.key.selection == "none" and row.extra["k_effective"] == 11
    assert (row.key.select_metric, row.solver) == ("", "")


def test_holdout_probe_and_shots(tmp_path):
    write_store(tmp_path, "bloodmnist")
    report = probe(dataset="bloodmnist", shots=[5], seeds=[0], selection="holdout",
                   workdir=tmp_path, solver="sklearn", progress=False)
    (row,) = report.computed
    assert row.n_train == 5 * 8 and row.key.shots == 5 and row.key.selection == "holdout"
    assert json.loads(row.key.params)["holdout_fraction"] == 0.2


def test_no_matching_store_says_to_extract_first(tmp_path):
    with pytest.raises(StoreError, match="medfm extract --dataset breastmnist"):
        probe(dataset="breastmnist", workdir=tmp_path, progress=False)


def test_the_solver_is_how_a_run_computes_not_which_run(tmp_path):
    """sklearn then torch on the same store and subsets: one run each, fitted once."""
    write_store(tmp_path, "bloodmnist")
    first = probe(dataset="bloodmnist", fractions=[0.5], seeds=[0], solver="sklearn",
                  workdir=tmp_path, progress=False)
    again = probe(dataset="bloodmnist", fractions=[0.5], seeds=[0], solver="torch",
                  workdir=tmp_path, progress=False)
    assert len(first.computed) == 1 and not again.computed and len(again.skipped) == 1
    assert Registry.in_workdir(tmp_path).query()[0].solver == "sklearn"
    assert resolve_solver("auto", device="cpu", work=55 * 1280) == "sklearn"
    assert resolve_solver("auto", device="cpu", work=90_000 * 1280 * 9) == "batched"
    with pytest.raises(InvalidArgumentError, match="unknown solver"):
        probe(dataset="bloodmnist", solver="lbfgs", workdir=tmp_path, progress=False)


def test_a_new_method_is_one_registration(tmp_path):
    """A nearest-centroid probe declared and registered like logreg and knn: probe() keys, fits
    and records it, and its option reaches its settings, with nothing else changed."""
    from medfm.probe.methods import _METHODS, Fitted, register
    from medfm.resolve.methods import _SPECS, MethodOption, MethodSpec, declare

    def fit(features, labels, task, rows, *, params, selection, seed, solver, device):
        X, y = features["train"][rows], labels["train"][rows]
        centroids = np.stack([X[y == c].mean(axis=0) for c in np.unique(y)])
        logits = -params["sharpness"] * ((features["test"][:, None] - centroids) ** 2).sum(-1)
        proba = np.exp(logits - logits.max(axis=1, keepdims=True))
        return Fitted((proba / proba.sum(axis=1, keepdims=True)).astype(np.float32), None,
                      {"centroids": len(centroids)}, "", "cpu")

    declare(MethodSpec(
        name="centroid", paradigm="nearest centroid", line_style="-.", selections=("none",),
        params=lambda selection, options: {"sharpness": options["sharpness"]},
        select_metric=lambda task, params: "",
        options=(MethodOption("sharpness", 0.1, (), "softmax temperature"),)))
    register("centroid", fit=fit)
    try:
        assert "centroid" in probe_methods()
        write_store(tmp_path, "bloodmnist")
        report = probe(dataset="bloodmnist", fractions=[1.0], seeds=[0], method="centroid",
                       sharpness=0.2, workdir=tmp_path, progress=False)
        (row,) = report.computed
        assert row.key.method == "centroid" and json.loads(row.key.params) == {"sharpness": 0.2}
        assert row.extra["centroids"] == 8 and row.auc > 0.75
        with pytest.raises(InvalidArgumentError, match="no option 'k'"):
            probe(dataset="bloodmnist", method="centroid", k=3, workdir=tmp_path,
                  progress=False)
    finally:
        _METHODS.pop("centroid")
        _SPECS.pop("centroid")


def _grid_distance(a: float, b: float) -> int:
    """How many C_GRID steps apart two chosen C values are."""
    return abs(list(C_GRID).index(a) - list(C_GRID).index(b))


@pytest.mark.parametrize("c_search", ["walk", "batch"])
@pytest.mark.parametrize("task", list(CASES))
def test_batched_solver_agrees_with_the_torch_walk(task, c_search):
    """The batched solver, walking the grid or solving every C at once, chooses the torch walk's
    C (or an adjacent one) and predicts as it does, on every task."""
    X, y = _blobs(task, 1200, 0, CASES[task])
    Xv, yv = _blobs(task, 300, 1, CASES[task])
    Xt, yt = _blobs(task, 800, 2, CASES[task])
    reference = LogisticProbe(solver="torch").fit(X, y, Xv, yv)
    batched = LogisticProbe(solver="batched", c_search=c_search).fit(X, y, Xv, yv)
    assert batched.solver_ == "batched" and batched.device_ == "cpu"
    assert _grid_distance(batched.C_, reference.C_) <= 1
    assert np.mean(batched.predict(Xt) == reference.predict(Xt)) >= 0.98
    assert abs(auc(yt, batched.predict_proba(Xt), task)
               - auc(yt, reference.predict_proba(Xt), task)) < 0.005
    assert all(step["converged"] for step in batched.path_)
    if batched.C_ == reference.C_:
        np.testing.assert_allclose(batched.predict_proba(Xt), reference.predict_proba(Xt),
                                   atol=0.02)


@pytest.mark.parametrize("kind", ["multinomial", "binary", "multilabel"])
def test_batched_solver_minimizes_sklearns_objective_for_every_C_at_once(kind):
    """fit_path solves every C of the grid together: each solution is scikit-learn's at that C
    (coefficients within the tolerance's reach), and each problem converged."""
    task = {"multinomial": Task.MULTI_CLASS, "binary": Task.BINARY,
            "multilabel": Task.MULTI_LABEL}[kind]
    X, y = _blobs(task, 600, 3, CASES[task])
    X = (X - X.mean(0)) / X.std(0)
    n_classes = CASES[task] if kind == "multinomial" else None
    Cs = [1e-3, 1e-2, 0.1, 1.0]
    together = make_solver("batched", X, y, kind, tol=1e-6, max_iter=500,
                           n_classes=n_classes).fit_path(Cs)
    sk = make_solver("sklearn", X, y, kind, tol=1e-6, max_iter=500, n_classes=n_classes)
    centre = (lambda W: W - W.mean(axis=0)) if kind == "multinomial" else (lambda W: W)
    for C, solution in zip(Cs, together, strict=True):
        assert solution.converged
        np.testing.assert_allclose(centre(solution.coef), centre(sk.fit(C).coef), atol=3e-3)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_the_sync_free_ladder_takes_the_steps_of_the_sequential_search(preconditioned):
    """On CUDA every candidate step is evaluated with no host synchronization; on a CPU they are
    tried one by one. Both take the largest step that decreases enough: the same iterates, bit
    for bit, plain or preconditioned; a problem that has converged stops moving while the others
    go on."""
    import torch

    from medfm.probe.batched import BatchedProblems, Preconditioner, minimize

    X, y = _blobs(Task.MULTI_CLASS, 500, 4, 3)
    Z = torch.as_tensor((X - X.mean(0)) / X.std(0))
    problems = BatchedProblems(Z, torch.as_tensor(y), "multinomial", 3)
    lam = torch.tensor([1 / (C * len(Z)) for C in (1e-3, 0.1, 10.0)])
    start = torch.zeros(3, 3 * DIM + 3)
    M = Preconditioner(Z) if preconditioned else None
    ladder = minimize(problems, start, lam, sync_free=True, preconditioner=M)
    sequential = minimize(problems, start, lam, sync_free=False, preconditioner=M)
    for a, b in zip(ladder[:3], sequential[:3], strict=True):
        assert torch.equal(a, b)
    x, n_iter, converged, _ = sequential
    assert converged.all() and (n_iter > 3).all()
    # started at its solution, the first problem takes no step; the others still converge
    again = minimize(problems, torch.cat([x[:1], start[1:]]), lam, sync_free=False,
                     preconditioner=M)
    assert again[1][0] == 0 and torch.equal(again[0][0], x[0])
    assert again[2].all() and (again[1][1:] > 3).all()


def test_holdout_selection_refits_with_the_batched_solver():
    X, y = _noisy(900, 0)
    reference = LogisticProbe(solver="torch", selection="holdout").fit(X, y)
    batched = LogisticProbe(solver="batched", selection="holdout", c_search="batch").fit(X, y)
    assert _grid_distance(batched.C_, reference.C_) <= 1
    Xt, yt = _noisy(600, 9)
    assert abs(batched.score(Xt, yt) - reference.score(Xt, yt)) <= 0.01


@pytest.mark.gpu
def test_probe_on_cuda_fits_every_C_at_once_on_resident_features(tmp_path):
    """On a GPU, `auto` is the batched solver: each store's features go to the device once, every
    C is solved together, the test metrics are computed there, and the rows agree with the CPU
    walk (the same or an adjacent C; metrics within the issue's tolerance)."""
    work = tmp_path / "w"
    for i, flag in enumerate(STORE_FLAGS):
        write_store(work, flag, seed=i)
    on_gpu = probe(fractions=[0.5, 1.0], seeds=[0], workdir=work, device="cuda", progress=False)
    on_cpu = probe(fractions=[0.5, 1.0], seeds=[0], workdir=work, device="cpu", solver="torch",
                   force=True, progress=False)
    cpu_rows = {r.key.digest(): r for r in on_cpu.computed}
    assert len(on_gpu.computed) == len(cpu_rows) == len(STORE_FLAGS) * 2
    for row in on_gpu.computed:
        assert (row.solver, row.device) == ("batched", "cuda")
        reference = cpu_rows[row.key.digest()]
        assert _grid_distance(row.chosen_C, reference.chosen_C) <= 1
        assert abs(row.acc - reference.acc) <= 0.05 and abs(row.auc - reference.auc) <= 0.02


@pytest.mark.gpu
def test_the_cuda_iterations_synchronize_with_the_host_only_every_few_iterations():
    """On CUDA the batched iterations never wait for the GPU except to ask, every CHECK_EVERY
    iterations, whether every problem has stopped (torch's sync debug mode counts them)."""
    import warnings

    import torch

    from medfm.probe.batched import CHECK_EVERY, BatchedProblems, minimize

    X, y = _blobs(Task.MULTI_CLASS, 4000, 4, 3)
    Z = torch.as_tensor((X - X.mean(0)) / X.std(0), device="cuda")
    problems = BatchedProblems(Z, torch.as_tensor(y, device="cuda"), "multinomial", 3)
    lam = torch.tensor([1 / (C * len(Z)) for C in C_GRID], device="cuda")
    start = torch.zeros(len(C_GRID), 3 * DIM + 3, device="cuda")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            minimize(problems, start, lam, max_iter=40)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 40 // CHECK_EVERY + 2, [str(w.message) for w in syncs[:3]]


def test_features_resident_as_tensors_give_the_rows_of_numpy_features(tmp_path):
    """The GPU path (features uploaded once as tensors, standardized, fitted, scored and
    evaluated on the device) run on the CPU device: every task's rows equal those from numpy
    features: the same C, metrics and intervals to rounding."""
    from medfm.probe import StoreArrays, probe_job
    from medfm.resolve.probe import resolve_probe
    from medfm.sampling import SubsetSpec
    from medfm.store.features import find_stores

    work = tmp_path / "w"
    for i, flag in enumerate(STORE_FLAGS):
        write_store(work, flag, seed=i)
    request = resolve_probe("logreg", solver="batched", device="cpu")
    for store in find_stores(work):
        on_host = StoreArrays.load(store)
        resident = StoreArrays.load(store, device="cpu")
        assert type(resident.features["train"]).__name__ == "Tensor"
        np.testing.assert_array_equal(resident.features["test"].numpy(), on_host.features["test"])
        for spec in (SubsetSpec(fraction=0.5, seed=1), SubsetSpec(fraction=1.0, seed=0)):
            host_row = probe_job(store, spec=spec, probe=request, arrays=on_host).row
            device_row = probe_job(store, spec=spec, probe=request, arrays=resident).row
            assert device_row.chosen_C == host_row.chosen_C, store.path.name
            for name in ("acc", "auc", "balanced_acc", "ece", "nll", "auc_ci_low", "auc_ci_high"):
                assert getattr(device_row, name) == pytest.approx(getattr(host_row, name),
                                                                  abs=1e-4), name


def _correlated(task: Task, n: int, seed: int, n_classes: int, dim: int = 96):
    """Features that share a few latent directions (as a backbone's do), so plain L-BFGS needs
    many iterations: (X, y)."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(98).normal(size=(8, dim))
    latent = rng.normal(size=(n, 8))
    X = (latent @ mix + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    if task is Task.MULTI_LABEL:
        return X, (latent[:, :n_classes] + 0.5 * rng.normal(size=(n, n_classes)) > 0.5
                   ).astype(np.int64)
    logits = latent[:, :n_classes] * 2 + rng.normal(size=(n, n_classes))
    return X, np.argmax(logits, axis=1) if n_classes > 2 else (logits[:, 0] > 0).astype(int)


@pytest.mark.parametrize("kind", ["multinomial", "binary", "multilabel"])
def test_the_preconditioned_solver_reaches_the_same_minimum_in_fewer_iterations(kind):
    """The batched solver preconditioned by the features' correlation (walking the grid, and
    every C at once) converges at every C in well under the plain walk's iterations on
    correlated features, to scikit-learn's solution as the plain one does (compared where
    float32 products resolve it: up to C = 0.1 here)."""
    from medfm.probe.batched import BatchedSolver

    task = {"multinomial": Task.MULTI_CLASS, "binary": Task.BINARY,
            "multilabel": Task.MULTI_LABEL}[kind]
    X, y = _correlated(task, 2000, 5, CASES[task])
    X = (X - X.mean(0)) / X.std(0)
    n_classes = CASES[task] if kind == "multinomial" else None
    Cs = [1e-3, 1e-2, 0.1, 1.0]
    sk = make_solver("sklearn", X, y, kind, tol=1e-6, max_iter=1000, n_classes=n_classes)
    reference = [sk.fit(C).coef for C in Cs]
    centre = (lambda W: W - W.mean(axis=0)) if kind == "multinomial" else (lambda W: W)
    iterations = {}
    for precondition in (False, True):
        walk = BatchedSolver(X, y, kind, tol=1e-6, max_iter=1000, n_classes=n_classes,
                             precondition=precondition)
        assert walk.preconditioned is precondition
        solved = [walk.fit(C) for C in Cs]
        together = BatchedSolver(X, y, kind, tol=1e-6, max_iter=1000, n_classes=n_classes,
                                 precondition=precondition).fit_path(Cs)
        for solution, expected in zip(solved[:3] + together[:3], reference[:3] * 2, strict=True):
            np.testing.assert_allclose(centre(solution.coef), centre(expected), atol=5e-3)
        assert all(s.converged for s in solved) and (not precondition
                                                      or all(s.converged for s in together))
        iterations[precondition] = sum(s.n_iter for s in solved)
    assert iterations[True] < 0.6 * iterations[False], iterations


def test_preconditioning_is_chosen_by_the_problem_size():
    """By default only fits with more rows than features, enough work, and an eigendecomposition
    small beside it are preconditioned; the PathMNIST-shaped fits at fractions 0.1 and 1.0 are,
    the 1% fit (900 rows) is not."""
    from medfm.probe.batched import Preconditioner

    assert Preconditioner.wanted(89_996, 1280, 9) and Preconditioner.wanted(9_000, 1280, 9)
    assert not Preconditioner.wanted(900, 1280, 9)  # fewer rows than features
    assert not Preconditioner.wanted(4_708, 1280, 1)  # real PneumoniaMNIST: too little work
    assert not Preconditioner.wanted(20_000, 4096, 2)  # its eigendecomposition would dominate


def test_the_gradient_product_in_row_blocks_equals_the_plain_product():
    """On a CPU the gradient's R^T Z is computed as one block of rows per thread (bmm) plus the
    rows left over: equal to the plain product within float32 rounding, for row counts that do
    and do not divide, and below the size where blocks are used."""
    import torch

    from medfm.probe.batched import BatchedProblems

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n in (5, 200, 201, 4099):
            Z = torch.randn(n, 37, generator=torch.Generator().manual_seed(n))
            flat = torch.randn(n, 6, generator=torch.Generator().manual_seed(n + 1))
            problems = BatchedProblems(Z, torch.zeros(n, dtype=torch.long), "multinomial", 3)
            torch.testing.assert_close(problems._residual_products(flat), flat.T @ Z,
                                       rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("solver, limited", [("batched", True), ("sklearn", False)])
def test_numpys_blas_runs_on_one_thread_while_a_torch_solver_fits(monkeypatch, solver, limited):
    """While a torch solver walks the grid on the CPU, the selection's numpy products run with
    one BLAS thread (their idle threads would spin on torch's cores); sklearn keeps its
    threads; after the fit the limit is gone."""
    from threadpoolctl import threadpool_info

    import medfm.probe.methods.logreg as logreg

    def blas_threads():
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before, seen = blas_threads(), []
    real = logreg.selection_metrics

    def observed(*args, **kwargs):  # the real selection, watched
        seen.append(blas_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(logreg, "selection_metrics", observed)
    X, y = _blobs(Task.MULTI_CLASS, 400, 0, 3)
    Xv, yv = _blobs(Task.MULTI_CLASS, 200, 1, 3)
    LogisticProbe(solver=solver).fit(X, y, Xv, yv)
    assert seen and all(threads == ([1] * len(before) if limited else before)
                        for threads in seen)
    assert blas_threads() == before
