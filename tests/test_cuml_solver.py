"""The cuML solver across cuML releases (issue 15 item 2): which arguments each release's
LogisticRegression takes and where it reports its iterations, decided from the version string
alone (runs everywhere), and, where cuML imports, the same C giving the same problem as
scikit-learn for every task kind, from data uploaded once.

Run: .venv/bin/python -m pytest tests/test_cuml_solver.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from medfm.errors import MedfmError
from medfm.probe.cuml_solver import cuml_api
from medfm.probe.solvers import LBFGS_HISTORY, cuml_available, make_solver


@pytest.mark.parametrize("version, normalized, memory, n_iter", [
    ("24.12.00", False, False, False),
    ("25.06.00", False, False, False),  # penalty_normalized=True was a TypeError here
    ("25.08.00", False, False, True),  # n_iter_ from here on
    ("25.10.01", False, False, True),
    ("25.12.00", True, True, True),  # penalty_normalized and lbfgs_memory from here on
    ("26.02.00a45", True, True, True),  # a nightly
    ("26.10", True, True, True),
])
def test_cuml_arguments_follow_the_installed_release(version, normalized, memory, n_iter):
    api = cuml_api(version)
    options = api.options(C=0.5, tol=1e-4, max_iter=100)
    assert options["C"] == 0.5 and options["penalty"] == "l2" and options["max_iter"] == 100
    assert ("penalty_normalized" in options) is normalized
    assert options.get("penalty_normalized", True) is True  # normalized whether said or not
    assert options.get("lbfgs_memory") == (LBFGS_HISTORY if memory else None)
    assert api.has_n_iter is n_iter


class _Fitted:
    """What a fitted LogisticRegression of each era holds about its iterations."""

    class solver_model:  # noqa: N801 - the QN solver cuML < 25.08 wraps, as it names it
        num_iters = 17

    n_iter_ = np.array([23])


def test_iterations_are_read_where_each_release_puts_them():
    assert cuml_api("25.06.00").iterations(_Fitted()) == 17
    assert cuml_api("25.08.00").iterations(_Fitted()) == 23


def test_a_version_that_is_not_a_release_is_one_line():
    with pytest.raises(MedfmError, match=r"^cuML version 'main' is not of the form YY\.MM; "
                                         r"install a cuML release .* or use --solver torch\.$"):
        cuml_api("main")


KINDS = {"binary": 1, "multinomial": 4, "multilabel": 3}


def _problem(kind: str, n: int = 1500, dim: int = 32):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    logits = X[:, :KINDS[kind]] * 2 + rng.normal(size=(n, KINDS[kind]))
    if kind == "binary":
        return X, (logits[:, 0] > 0).astype(np.int64)
    if kind == "multinomial":
        return X, np.argmax(logits, axis=1)
    return X, (logits > 0.5).astype(np.int64)


@pytest.mark.gpu
@pytest.mark.skipif(not cuml_available(), reason="cuML does not import here (extra gpu)")
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuml_solves_the_problem_sklearn_solves_at_each_C(kind):
    import cupy

    X, Y = _problem(kind)
    n_classes = KINDS[kind] if kind == "multinomial" else None
    cu = make_solver("cuml", X, Y, kind, tol=1e-6, max_iter=1000, n_classes=n_classes)
    assert isinstance(cu.X, cupy.ndarray)  # on the GPU once, for every C and label
    uploaded = cu.X.data.ptr
    for C in (0.01, 1.0):
        sk = make_solver("sklearn", X, Y, kind, tol=1e-6, max_iter=1000).fit(C)
        got = cu.fit(C)
        assert got.converged and 0 < got.n_iter < 1000
        np.testing.assert_allclose(got.coef, sk.coef, atol=2e-3 * np.abs(sk.coef).max())
        np.testing.assert_allclose(got.intercept, sk.intercept, atol=2e-3 + 2e-3 * np.abs(
            sk.intercept).max())
    assert cu.X.data.ptr == uploaded
