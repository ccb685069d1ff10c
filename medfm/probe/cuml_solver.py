"""The `cuml` probe solver: cuML's quasi-Newton LogisticRegression on a GPU (extra `gpu`).

    solver = CumlSolver(X, y, "binary", max_iter=100, tol=1e-4)   # X, y uploaded once
    solution = solver.fit(C=1.0)                                   # every C reuses them

Objective. cuML averages the loss over the n samples and, with its penalty normalized (the only
way it has run before 25.12, the default since), divides the L2 penalty 1 / (2 C) ||W||^2 by n
too: exactly solvers.py's objective divided by C * n, so the same C is the same problem in every
solver. Multilabel targets are fitted one label at a time; each C starts cold (no warm start).

Stopping rule (cuML's own, not scipy's): after iteration k, with f the scaled objective above
and g its gradient, cuML stops when
    max_j |g_j| <= tol * max(f, tol)                      (gradient test), or
    |f_(k-10) - f_k| <= (tol / 100) * max(f, tol)         (change test over 10 iterations),
or after `max_iter` iterations. For a probe worth fitting f < 1 (log 2 at W = 0 for a binary
task), so the gradient test is stricter than scikit-learn's max_j |g_j| <= tol, while the change
test can stop a slow walk earlier. `converged` says it stopped by a test before `max_iter`.

What differs between cuML releases is resolved from its version by `cuml_api`, a pure function:
LogisticRegression takes `penalty_normalized` and `lbfgs_memory` from 25.12 on (before, either
is a TypeError, the penalty is normalized and the L-BFGS memory is 5), and reports `n_iter_`
from 25.08 on (before, the iterations are read from the QN solver it wraps).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from medfm.errors import InvalidArgumentError
from medfm.probe.objective import LBFGS_HISTORY, Solution


@dataclass(frozen=True)
class CumlApi:
    """What the LogisticRegression of one cuML release takes and reports."""

    takes_penalty_normalized: bool  # LogisticRegression(penalty_normalized=...): 25.12 on
    takes_lbfgs_memory: bool  # LogisticRegression(lbfgs_memory=...): 25.12 on (5 before)
    has_n_iter: bool  # fitted `n_iter_`: 25.08 on; before, `solver_model.num_iters`

    def options(self, *, C: float, tol: float, max_iter: int) -> dict:
        """LogisticRegression's keyword arguments for solvers.py's objective at `C`."""
        options = {"C": C, "penalty": "l2", "tol": tol, "max_iter": max_iter,
                   "output_type": "numpy"}
        if self.takes_penalty_normalized:
            options["penalty_normalized"] = True  # the default; said so as not to depend on it
        if self.takes_lbfgs_memory:
            options["lbfgs_memory"] = LBFGS_HISTORY  # scikit-learn's (scipy's) memory
        return options

    def iterations(self, model) -> int:
        """L-BFGS iterations a fitted LogisticRegression took."""
        if self.has_n_iter:
            return int(np.max(model.n_iter_))
        return int(model.solver_model.num_iters)


def cuml_api(version: str) -> CumlApi:
    """The API of cuML `version` ("25.12.00", "26.02.00a45", "25.10.01"); one that does not
    start with YY.MM is an error saying what to do."""
    found = re.match(r"\s*(\d+)\.(\d+)", version)
    if found is None:
        raise InvalidArgumentError(f"cuML version {version!r} is not of the form YY.MM; install "
                                   "a cuML release (pip install 'medfm[gpu]') or use "
                                   "--solver torch.")
    release = (int(found[1]), int(found[2]))
    return CumlApi(takes_penalty_normalized=release >= (25, 12),
                   takes_lbfgs_memory=release >= (25, 12), has_n_iter=release >= (25, 8))


class CumlSolver:
    """cuML's LogisticRegression (GPU) on training data uploaded once; cold start at every C."""

    name, device_type = "cuml", "cuda"
    solves_path = False  # no multi-C fit in cuML: every C is its own cold fit
    torch_threads = False  # runs on the GPU through cuML

    def __init__(self, X: np.ndarray, Y: np.ndarray, kind: str, *, max_iter: int, tol: float):
        import cupy
        import cuml

        self.api = cuml_api(cuml.__version__)
        self.kind, self.max_iter, self.tol = kind, max_iter, tol
        self.dim = X.shape[1]
        # (N, D) float32 on the GPU once: cuML takes a device array of its dtype without a copy
        self.X = cupy.asarray(np.ascontiguousarray(X, dtype=np.float32))
        columns = [Y[:, j] for j in range(Y.shape[1])] if kind == "multilabel" else [Y]
        self.targets = [cupy.asarray(y, dtype=np.float32) for y in columns]  # (N,) each

    def fit(self, C: float, init: Solution | None = None) -> Solution:
        from cuml.linear_model import LogisticRegression

        coefs, intercepts, iters = [], [], []
        for y in self.targets:
            model = LogisticRegression(**self.api.options(C=C, tol=self.tol,
                                                          max_iter=self.max_iter))
            model.fit(self.X, y)
            coefs.append(np.asarray(model.coef_, dtype=np.float64).reshape(-1, self.dim))
            intercepts.append(np.asarray(model.intercept_, dtype=np.float64).reshape(-1))
            iters.append(self.api.iterations(model))
        return Solution(np.concatenate(coefs), np.concatenate(intercepts), max(iters),
                        max(iters) < self.max_iter)
