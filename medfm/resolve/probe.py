"""Probe requests: which declared method, with which settings, selecting how, on which
store's training subset; and its key.

    from medfm.resolve.probe import resolve_probe
    request = resolve_probe("knn", knn_metric="euclidean")
    request.key(store, SubsetSpec(fraction=0.1, seed=0))   # store: a FeatureStore (or any
    #                          object with the `request` identity and `fingerprint` it records)

How the probe computes (solver, device) is part of the request and not of the key: rows record
it. The dataset of a store is resolved once per store (`store.request["dataset"]`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from medfm.data import get_dataset
from medfm.errors import InvalidArgumentError
from medfm.resolve.defaults import PROBE_METHOD, SOLVERS
from medfm.resolve.keys import ResultKey, canonical_json, run_key
from medfm.resolve.methods import get_method_spec
from medfm.runtime import device_type
from medfm.sampling import SubsetSpec


@dataclass(frozen=True)
class ProbeRequest:
    """What to fit on each store: a declared method, its settings, how it selects, and how
    it computes (solver and device: not part of a result's identity)."""

    method: str  # a declared probe method (medfm.resolve.methods)
    params: str  # canonical JSON of the settings that enter the key
    selection: str  # val | holdout | none
    solver: str = "auto"  # one of SOLVERS, for methods that fit with a solver
    device: str | None = None  # cpu | cuda | None (cuda when visible)

    @property
    def settings(self) -> dict:
        """The settings that enter the key, as a dict."""
        return json.loads(self.params)

    def metrics_device(self) -> str | None:
        """"cuda" when this request computes on a GPU (test metrics are then computed there),
        else None (numpy on the host)."""
        return "cuda" if device_type(self.device) == "cuda" else None

    def features_device(self) -> str | None:
        """"cuda" when the batched solver fits on a GPU: each store's features are uploaded once
        and standardized, fitted and scored there; else None (numpy on the host)."""
        if self.solver == "batched" and get_method_spec(self.method).uses_solver:
            return self.metrics_device()
        return None

    def key(self, store, spec: SubsetSpec) -> ResultKey:
        """The registry key of this probe on `store`'s training subset `spec`."""
        task = get_dataset(store.request["dataset"]).task
        settings = self.settings
        return run_key(store=store.request, store_fingerprint=store.fingerprint,
                       method=self.method, params=settings, selection=self.selection,
                       select_metric=get_method_spec(self.method).select_metric(task, settings),
                       spec=spec)


def resolve_probe(method: str = PROBE_METHOD, *, selection: str | None = None,
                  solver: str = "auto", device: str | None = None,
                  **options) -> ProbeRequest:
    """The probe request for a method name, its options (e.g. `knn_metric`) and selection
    (None: the method's default), checked before any store is opened."""
    spec = get_method_spec(method)
    selection = spec.check_selection(selection)
    params = spec.params(selection, spec.resolve_options(options))
    if solver not in SOLVERS:
        raise InvalidArgumentError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}.")
    return ProbeRequest(method, canonical_json(params), selection, solver, device)
