"""Probe methods as a registry: each method declares itself in one module of this package.

    from medfm.probe.methods import get_method, probe_methods
    method = get_method("knn")
    method.params(selection="none", options={"knn_metric": "cosine"})   # what enters the key

A method module builds one `ProbeMethod` and calls `register(...)` at import: its name, the
settings that enter a result's key, how to fit it on a store's features, the model-selection
rules it supports, the command-line options it adds to `medfm probe`, and how reports draw it.
Every module in this package is imported on first use, so adding a method is one new module
(and its tests); the CLI, the grid spec, the key and the report pick it up from here. Method
modules stay light at import (no scikit-learn, SciPy or torch): key building must stay cheap.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfm.data import Task
from medfm.errors import InvalidArgumentError


@dataclass(frozen=True)
class MethodOption:
    """A setting of one method, offered as a keyword of `probe()` and a `medfm probe` flag."""

    name: str  # keyword, e.g. "knn_metric"
    default: Any  # value when not given
    choices: tuple = ()  # allowed values ((): any)
    help: str = ""  # one line for --help

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


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
    """One probe method (see the module docstring)."""

    name: str  # what `--method` and the registry's `method` column say
    paradigm: str  # how reports name it, e.g. "linear probe"
    line_style: str  # matplotlib line style of its curves in report plots
    selections: tuple[str, ...]  # model-selection rules it accepts; the first is the default
    params: Callable[[str, dict], dict]  # (selection, options) -> settings that enter the key
    select_metric: Callable[[Task, dict], str]  # (task, params) -> what its selection
    #                                              optimizes: acc | auc | loss | "" (none)
    fit: Callable[..., Fitted]  # (features, labels, task, train_rows, *, params, selection,
    #                              seed, solver, device) -> Fitted
    options: tuple[MethodOption, ...] = ()  # extra keywords / flags
    uses_solver: bool = False  # whether `--solver` chooses how it fits
    reads_store: bool = True  # fitted on a feature store (every probe so far)
    trains: bool = True  # fitted on a training subset; False (zero-shot): one run per store with
    #                      no training subset (sampling.NoSubset), its fit given `store=`
    refuses: Callable[[Any], str | None] | None = None  # (store) -> why the method cannot use
    #        it (None: it can); a probe over matching stores skips those, a named store is an error
    seed_changes_fit: Callable[[str], bool] = field(default=lambda selection: False)
    # (selection) -> whether the seed changes the fit beyond the subset (holdout draws)
    save_state: Callable[[Any], dict] | None = None  # fitted model -> arrays to keep
    load_state: Callable[[dict], Any] | None = None  # those arrays -> a model that predicts
    # (None: the method keeps nothing; scoring a new split refits it, as cheap as loading)

    def resolve_options(self, options: dict) -> dict:
        """`options` checked against this method's, with defaults filled in."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InvalidArgumentError(
                f"method {self.name} has no option {unknown[0]!r}; its options: "
                f"{', '.join(known) or 'none'}.")
        resolved = {}
        for name, option in known.items():
            value = options.get(name, option.default)
            if option.choices and value not in option.choices:
                raise InvalidArgumentError(
                    f"{option.flag} {value!r} is not one of {', '.join(map(str, option.choices))}.")
            resolved[name] = value
        return resolved

    def check_selection(self, selection: str | None) -> str:
        """`selection` if this method supports it (None: its default)."""
        if selection is None:
            return self.selections[0]
        if selection not in self.selections:
            raise InvalidArgumentError(
                f"method {self.name} selects with {', '.join(self.selections)}, not "
                f"{selection!r}.")
        return selection


_METHODS: dict[str, ProbeMethod] = {}
_LOADED = False


def register(method: ProbeMethod) -> ProbeMethod:
    """Add a method to the registry (called by each method module at import)."""
    _METHODS[method.name] = method
    return method


def _load() -> None:
    """Import every module of this package once, so each registers its method."""
    global _LOADED
    if not _LOADED:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _LOADED = True


def probe_methods() -> dict[str, ProbeMethod]:
    """Every registered method by name."""
    _load()
    return dict(_METHODS)


def get_method(name: str) -> ProbeMethod:
    """The method called `name`; an unknown name is an error listing the known ones."""
    methods = probe_methods()
    if name not in methods:
        close = difflib.get_close_matches(name, methods, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise InvalidArgumentError(
            f"unknown probe method {name!r}.{hint} Known: {', '.join(methods)}.")
    return methods[name]
