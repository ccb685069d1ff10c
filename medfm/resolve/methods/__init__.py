"""Probe methods as declarations: what each method is called, which of its settings enter a
result's key, which model-selection rules and options it takes, and how reports draw it.

    from medfm.resolve.methods import get_method_spec, method_specs
    spec = get_method_spec("knn")
    spec.params("none", spec.resolve_options({"knn_metric": "cosine"}))   # what enters the key

One module of this package per method calls `declare(MethodSpec(...))` at import; every module
is imported on first use. How a method is fitted lives in the probe stage, in the module of the
same name in medfm/probe/methods/ (which registers its `fit`): adding a probe method is this
declaration and that implementation, and the CLI, the grid spec, the key, presets and the report
pick it up from here. Declarations import no scikit-learn, SciPy or torch: key building stays
cheap and anything above the resolution layer may read them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medfm.data import Task
from medfm.errors import InvalidArgumentError
from medfm.plugins import load_package


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
class MethodSpec:
    """What a probe method is, as keys, options and reports see it (module docstring)."""

    name: str  # what `--method` and the registry's `method` column say
    paradigm: str  # how reports name it, e.g. "linear probe"
    line_style: str  # matplotlib line style of its curves in report plots
    selections: tuple[str, ...]  # model-selection rules it accepts; the first is the default
    params: Callable[[str, dict], dict]  # (selection, options) -> settings that enter the key
    select_metric: Callable[[Task, dict], str]  # (task, params) -> what its selection
    #                                              optimizes: acc | auc | loss | "" (none)
    options: tuple[MethodOption, ...] = ()  # extra keywords / flags
    uses_solver: bool = False  # whether `--solver` chooses how it fits
    reads_store: bool = True  # fitted on a feature store (every probe so far)
    trains: bool = True  # fitted on a training subset; False (zero-shot): one run per store with
    #                      no training subset (sampling.NoSubset), its fit given `store=`
    seed_changes_fit: Callable[[str], bool] = field(default=lambda selection: False)
    # (selection) -> whether the seed changes the fit beyond the subset (holdout draws)

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


_SPECS: dict[str, MethodSpec] = {}


def declare(spec: MethodSpec) -> MethodSpec:
    """Add a method's declaration (called by each module of this package at import)."""
    _SPECS[spec.name] = spec
    return spec


def method_specs() -> dict[str, MethodSpec]:
    """Every declared method by name."""
    load_package(__name__)  # each module of this package declares one
    return dict(_SPECS)


def get_method_spec(name: str) -> MethodSpec:
    """The method called `name`; an unknown name is an error listing the known ones."""
    specs = method_specs()
    if name not in specs:
        close = difflib.get_close_matches(name, specs, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise InvalidArgumentError(
            f"unknown probe method {name!r}.{hint} Known: {', '.join(specs)}.")
    return specs[name]
