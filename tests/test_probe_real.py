"""The probe on real features: PneumoniaMNIST and BreastMNIST (official files) through the
pretrained Lite0."""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest
from medmnist import Evaluator

from medfm.cli import main
from medfm.data import Task
from medfm.extract import extract
from medfm.metrics import acc, auc
from medfm.resolve.defaults import C_GRID
from medfm.probe import LogisticProbe, StoreArrays, probe
from medfm.runtime import NVIDIA_MARKERS
from medfm.probe.methods.logreg import PATIENCE
from medfm.sampling import SubsetSpec, sample
from medfm.store.features import find_stores
from medfm.store.registry import Registry


@pytest.fixture(scope="module")
def pneumonia_workdir(real_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pneumonia")
    # 28 px fed natively: 5,856 real images through the real ImageNet Lite0 in seconds
    extract(dataset="pneumoniamnist", size=28, backbone="tf_efficientnet_lite0.in1k",
            resize_policy="native", data_root=real_root, workdir=workdir, progress=False)
    return workdir


@pytest.fixture(scope="module")
def breast_workdir(real_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("breast")
    extract(dataset="breastmnist", size=28, backbone="tf_efficientnet_lite0.in1k",
            resize_policy="native", data_root=real_root, workdir=workdir, progress=False)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["sklearn", "torch"])
def test_full_fraction_probe_equals_medmnist_evaluator(pneumonia_workdir, real_root, solver):
    # force: the solver is not part of a run's key, so the second solver refits the same run
    report = probe(dataset="pneumoniamnist", fractions=[1.0], seeds=[0], solver=solver,
                   workdir=pneumonia_workdir, force=True, progress=False)
    (row,) = report.computed
    assert row.solver == solver
    assert row.key.select_metric == "loss"  # C chosen by val log-loss (issue 12)
    y_true, y_score = Registry.in_workdir(pneumonia_workdir).scores(row.key)
    official = Evaluator("pneumoniamnist", "test", root=str(real_root)).evaluate(y_score)
    np.testing.assert_array_equal(y_true.ravel(), Evaluator(
        "pneumoniamnist", "test", root=str(real_root)).labels.ravel())
    assert row.acc == official.ACC
    assert row.auc == pytest.approx(official.AUC, abs=1e-12)  # summation order only
    assert row.auc > 0.85 and row.acc > 0.75  # ImageNet features do separate pneumonia


@pytest.mark.slow
def test_immediate_rerun_recomputes_nothing(pneumonia_workdir, capsys, monkeypatch):
    argv = ["probe", "--dataset", "pneumoniamnist", "--fractions", "0.1,1.0", "--seeds", "0,1",
            "--workdir", str(pneumonia_workdir), "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()

    def no_features(store):
        raise AssertionError(f"a rerun must not read features ({store.path})")

    monkeypatch.setattr("medfm.probe.run.StoreArrays.load", no_features)
    monkeypatch.setattr("medfm.extract.extractor.create_backbone", no_features)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "0 run(s) fitted, 4 already in the registry (nothing needed recomputing" in out

    # a fresh process finds the same: it loads neither torch, scikit-learn nor the medmnist
    # package (seconds of imports), only the registry and the store's header
    code = ("import sys; from medfm.cli import main; rc = main(sys.argv[1:]); "
            "print([m for m in ('torch', 'sklearn', 'scipy', 'medmnist') if m in sys.modules]); "
            "sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert "nothing needed recomputing" in run.stdout
    # a host with an NVIDIA driver imports torch to ask CUDA which device `auto` means
    allowed = {"torch"} if any(map(os.path.exists, NVIDIA_MARKERS)) else set()
    assert set(ast.literal_eval(run.stdout.strip().splitlines()[-1])) <= allowed


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["sklearn", "torch"])
def test_stopped_walk_chooses_the_whole_walks_C_on_real_stores(pneumonia_workdir, breast_workdir,
                                                                solver):
    """The val-loss walk stopped after PATIENCE C values that do not beat the best chooses the
    same C (and so the same model) as the walk over the whole grid, on real features at every
    fraction; and it does stop early, which is what makes it worth having."""
    fits = {"stopped": 0, "whole": 0}
    for workdir, dataset in ((breast_workdir, "breastmnist"),
                             (pneumonia_workdir, "pneumoniamnist")):
        (store,) = find_stores(workdir, dataset=dataset)
        arrays = StoreArrays.load(store)
        for fraction, seed in ((0.1, 0), (0.1, 1), (0.3, 0), (1.0, 0)):
            rows = sample(arrays.labels["train"], Task.BINARY,
                          SubsetSpec(fraction=fraction, seed=seed)).indices
            args = (arrays.features["train"][rows], arrays.targets["train"][rows],
                    arrays.features["val"], arrays.targets["val"])
            whole = LogisticProbe(solver=solver, patience=None).fit(*args)
            stopped = LogisticProbe(solver=solver, patience=PATIENCE).fit(*args)
            assert stopped.C_ == whole.C_, (dataset, fraction, seed)
            np.testing.assert_array_equal(stopped.predict_proba(arrays.features["test"]),
                                          whole.predict_proba(arrays.features["test"]))
            fits["stopped"] += len(stopped.path_)
            fits["whole"] += len(whole.path_)
    assert fits["whole"] == 8 * len(C_GRID) and fits["stopped"] < 0.8 * fits["whole"]


@pytest.mark.slow
def test_batched_solver_agrees_with_the_sequential_walk_on_real_stores(pneumonia_workdir,
                                                                        breast_workdir):
    """On real Lite0 features of BreastMNIST and PneumoniaMNIST, at fractions 0.1, 0.3 and 1.0
    and seeds 0-2, the batched solver (walking the grid, and every C at once; plain, and
    preconditioned although these stores are below its default size) chooses the C of
    today's sequential torch walk or an adjacent one, and where it is the same C, the test ACC
    is within 0.3 points (or one test image) and the AUC within 0.1 points."""
    grid = list(C_GRID)
    same = total = 0
    for workdir, dataset in ((breast_workdir, "breastmnist"),
                             (pneumonia_workdir, "pneumoniamnist")):
        (store,) = find_stores(workdir, dataset=dataset)
        arrays = StoreArrays.load(store)
        y_test = arrays.labels["test"]
        for fraction in (0.1, 0.3, 1.0):
            for seed in (0, 1, 2) if fraction < 1.0 else (0,):  # 1.0: the same images
                rows = sample(arrays.labels["train"], Task.BINARY,
                              SubsetSpec(fraction=fraction, seed=seed)).indices
                args = (arrays.features["train"][rows], arrays.targets["train"][rows],
                        arrays.features["val"], arrays.targets["val"])
                reference = LogisticProbe(solver="torch").fit(*args)
                ref_scores = reference.predict_proba(arrays.features["test"])
                for c_search, precondition in (("walk", None), ("batch", None),
                                               ("walk", True), ("batch", True)):
                    model = LogisticProbe(solver="batched", c_search=c_search,
                                          precondition=precondition).fit(*args)
                    scores = model.predict_proba(arrays.features["test"])
                    assert abs(grid.index(model.C_) - grid.index(reference.C_)) <= 1
                    total += 1
                    if model.C_ != reference.C_:
                        continue
                    same += 1
                    d_acc = abs(acc(y_test, scores, Task.BINARY)
                                - acc(y_test, ref_scores, Task.BINARY))
                    assert d_acc <= max(0.003, 1 / len(y_test) + 1e-12), (dataset, fraction)
                    assert abs(auc(y_test, scores, Task.BINARY)
                               - auc(y_test, ref_scores, Task.BINARY)) <= 0.001
    assert same >= total - 2, (same, total)  # an adjacent C is the exception, not the rule
