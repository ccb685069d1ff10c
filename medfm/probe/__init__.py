"""The probe stage: probes fitted on cached features (logistic regression, kNN, ...), each
method registered in its own module of medfm.probe.methods.

    from medfm.probe import probe
    probe(dataset="breastmnist", fractions=[0.1, 1.0], seeds=[0, 1, 2])
"""

from medfm.probe.methods import ProbeMethod, get_method, probe_methods
from medfm.probe.run import ProbeReport, StoreArrays, matching_stores, probe, probe_job
from medfm.resolve.methods import MethodOption
from medfm.resolve.probe import ProbeRequest, resolve_probe
from medfm.resolve.defaults import SOLVERS
from medfm.probe.solvers import resolve_solver

_ESTIMATORS = {"KNNProbe": "medfm.probe.methods.knn", "LogisticProbe": "medfm.probe.methods.logreg",
               "C_GRID": "medfm.resolve.defaults", "KNN_K": "medfm.resolve.methods.knn",
               "SimpleShotProbe": "medfm.probe.methods.simpleshot"}


def __getattr__(name: str):
    """Estimators and their constants live in their method modules."""
    if name in _ESTIMATORS:
        import importlib

        return getattr(importlib.import_module(_ESTIMATORS[name]), name)
    raise AttributeError(f"module 'medfm.probe' has no attribute {name!r}")


__all__ = [
    "C_GRID", "KNN_K", "SOLVERS", "KNNProbe", "LogisticProbe", "MethodOption", "ProbeMethod",
    "SimpleShotProbe",
    "ProbeReport", "ProbeRequest", "StoreArrays", "get_method", "matching_stores", "probe",
    "probe_job", "probe_methods", "resolve_probe", "resolve_solver",
]
