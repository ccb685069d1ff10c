"""Probe settings that enter result keys, kept free of heavy imports.

`medfm probe` reads these to build the keys it looks up in the registry; scikit-learn, SciPy and
torch load only when something is actually fitted, so a rerun that finds everything done starts
and finishes in about a second.
"""

from __future__ import annotations

import numpy as np

KNN_K = 11  # neighbours (MedMNIST+)
KNN_METRICS = ("cosine", "euclidean")
# 1e-4 .. 1e2, half a decade apart: with standardized ~1k-d features, C * n spans strongly
# regularized few-shot fits (n ~ 10) to nearly unregularized full-split fits (n ~ 1e5)
C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 13))
SELECTIONS = ("val", "holdout")  # where C is chosen
HOLDOUT_FRACTION = 0.2  # share of the training subset held out under selection="holdout"
