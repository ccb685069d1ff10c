"""How each probe method is fitted: one module per method, beside its declaration.

    from medfm.probe.methods import get_method, probe_methods
    method = get_method("knn")
    method.fit(features, labels, task, train_rows, params=..., selection="none", seed=0,
               solver="auto", device=None)

A method is declared in medfm.resolve.methods (its name, the settings in its key, selections,
options, how reports draw it) and fitted here: the module of the same name in this package calls
`register(name, fit=..., save_state=..., load_state=...)` at import. `get_method` joins the two:
a `ProbeMethod` answers every declared attribute (`options`, `params`, `uses_solver`...) and
fits. A declared method with no module here is an error naming it. Method modules stay light at
import (no scikit-learn, SciPy or torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfm.errors import InvalidArgumentError
from medfm.plugins import load_package
from medfm.resolve.methods import MethodSpec, get_method_spec, method_specs


@dataclass(frozen=True)
class Fitted:
    """What fitting a probe on one training subset produced."""

    scores: np.ndarray  # (N_test, C) float32 test probabilities
    chosen_C: float | None  # the regularization chosen, when the method chooses one
    extra: dict  # method details recorded with the row (path, iterations, effective k...)
    solver: str  # what fitted it ("" when nothing is fitted)
    device: str  # device type it computed on
    model: Any = None  # the fitted estimator (predict_proba), to score more splits later


@dataclass(frozen=True)
class ProbeMethod:
    """A declared method (medfm.resolve.methods.MethodSpec) with its fitting: every declared
    attribute reads through (`method.options`, `method.params(...)`)."""

    spec: MethodSpec
    fit: Callable[..., Fitted]  # (features, labels, task, train_rows, *, params, selection,
    #                              seed, solver, device) -> Fitted
    refuses: Callable[[Any], str | None] | None = None  # (store) -> why the method cannot use
    #        it (None: it can); a probe over matching stores skips those, a named store is an error
    save_state: Callable[[Any], dict] | None = None  # fitted model -> arrays to keep
    load_state: Callable[[dict], Any] | None = None  # those arrays -> a model that predicts
    # (None: the method keeps nothing; scoring a new split refits it, as cheap as loading)

    def __getattr__(self, name: str):
        return getattr(self.spec, name)


_METHODS: dict[str, ProbeMethod] = {}


def register(name: str, *, fit: Callable[..., Fitted], save_state=None, load_state=None,
             refuses=None) -> ProbeMethod:
    """Add the fitting of declared method `name` (called by each module here at import)."""
    method = ProbeMethod(get_method_spec(name), fit, refuses=refuses, save_state=save_state,
                         load_state=load_state)
    _METHODS[name] = method
    return method


def probe_methods() -> dict[str, ProbeMethod]:
    """Every declared method, with its fitting, by name."""
    load_package(__name__)  # each module of this package registers one
    missing = sorted(set(method_specs()) - set(_METHODS))
    if missing:
        raise InvalidArgumentError(
            f"probe method {missing[0]!r} is declared (medfm/resolve/methods) but has no "
            f"module in medfm/probe/methods that registers how it is fitted; add one.")
    return {name: _METHODS[name] for name in method_specs()}


def get_method(name: str) -> ProbeMethod:
    """The method called `name`; an unknown name is an error listing the known ones."""
    get_method_spec(name)  # unknown: one line listing the declared methods
    return probe_methods()[name]
