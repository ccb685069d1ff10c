"""What every probe solver minimizes and returns (medfm.probe.solvers states the objective).

    from medfm.probe.objective import Solution, DEFAULT_TOL
    Solution(coef, intercept, n_iter, converged)

A module of its own so that each solver module (solvers.py, batched.py, cuml_solver.py) imports
it and none imports another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfm.resolve.defaults import LOGREG_MAX_ITER, LOGREG_TOL

KINDS = ("binary", "multinomial", "multilabel")  # loss families
DEFAULT_MAX_ITER = LOGREG_MAX_ITER  # L-BFGS iterations per C (scikit-learn's default)
DEFAULT_TOL = LOGREG_TOL  # largest absolute gradient component at convergence (sklearn's default)
LBFGS_HISTORY = 10  # L-BFGS memory (scipy's default, which scikit-learn uses)


@dataclass(frozen=True)
class Solution:
    """A fitted linear model at one C, in the (standardized) space the solver was given."""

    coef: np.ndarray  # (K', D) float64; K' = 1 (binary), K (multinomial) or L (multilabel)
    intercept: np.ndarray  # (K',) float64
    n_iter: int  # L-BFGS iterations taken (multilabel sklearn/cuml: the most of any label)
    converged: bool  # gradient below tol before max_iter (multilabel: every label)
