"""The probe stage: logistic-regression and kNN probes on cached features (see run.py)."""

from medfm.probe.backends import BACKENDS, resolve_backend
from medfm.probe.knn import KNN_K, KNNProbe
from medfm.probe.logreg import C_GRID, HOLDOUT_FRACTION, SELECTIONS, LogisticProbe
from medfm.probe.run import (
    PROBE_METHODS,
    ProbeReport,
    StoreArrays,
    probe,
    probe_job,
    probe_store,
)

__all__ = [
    "BACKENDS", "C_GRID", "HOLDOUT_FRACTION", "KNN_K", "PROBE_METHODS", "SELECTIONS",
    "KNNProbe", "LogisticProbe", "ProbeReport", "StoreArrays", "probe", "probe_job", "probe_store",
    "resolve_backend",
]
