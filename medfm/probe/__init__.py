"""The probe stage: logistic-regression and kNN probes on cached features (see run.py)."""

from medfm.probe.backends import BACKENDS, resolve_backend
from medfm.probe.run import (
    PROBE_METHODS,
    ProbeReport,
    StoreArrays,
    probe,
    probe_job,
    probe_store,
)
from medfm.probe.settings import C_GRID, HOLDOUT_FRACTION, KNN_K, SELECTIONS

_ESTIMATORS = {"KNNProbe": "medfm.probe.knn", "LogisticProbe": "medfm.probe.logreg"}


def __getattr__(name: str):
    """The estimators import scikit-learn, so they load on first use, not with the package."""
    if name in _ESTIMATORS:
        import importlib

        return getattr(importlib.import_module(_ESTIMATORS[name]), name)
    raise AttributeError(f"module 'medfm.probe' has no attribute {name!r}")


__all__ = [
    "BACKENDS", "C_GRID", "HOLDOUT_FRACTION", "KNN_K", "PROBE_METHODS", "SELECTIONS",
    "KNNProbe", "LogisticProbe", "ProbeReport", "StoreArrays", "probe", "probe_job", "probe_store",
    "resolve_backend",
]
