"""Grid specs: a YAML file (or a named preset) -> one validated, frozen `GridSpec`.

    from medfm.grid.spec import load_spec, preset_spec
    spec = load_spec("examples/grid_demo.yaml")
    spec = preset_spec("seed-paper", datasets=["breastmnist"], sizes=[28])

A spec file names the axes of the grid; everything but `sizes` and `backbones` has a default
(DEFAULTS):

    datasets: [breastmnist, pneumoniamnist]   # default: every MedMNIST dataset whose file is
                                              # present (the others are skipped, one line each)
    sizes: [28, 64]
    backbones: [resnet18, dino_vitb16]        # any spelling: alias, arch, arch.tag
    weights: null            # null: each backbone's pretrained weights; "random" or a file path
    fractions: [0.01, 0.1, 1.0]
    shots: []                # labelled images per class, instead of / besides fractions
    seeds: [0, 1, 2]
    methods: [logreg, finetune]   # any registered probe method (logreg, knn, ...), finetune and
                             # head-probe (the head trained through the frozen backbone)
    probe_options: {}        # probe methods' own settings, e.g. {knn_metric: euclidean}
    solver: auto             # how logreg is fitted: auto | sklearn | torch | cuml
    selection: null          # probe model selection: null (each method's default) | val | holdout
    resize_policy: null      # preprocessing of every job, extract and fine-tune alike:
    input_size: null         #   null = the default (bilinear to the backbone's input size,
    normalize: null          #   its mean/std); a fine-tune override below wins for fine-tunes
    dtype: float16           # feature store dtype
    device: null             # null: CUDA when visible, else CPU
    data_root: null          # null: $MEDFM_DATA_ROOT or ~/.medmnist
    finetune: {recipe: medfm, overrides: {epochs: 5}}
    sampler: shuffled        # how subsets are drawn (medfm.sampling.SAMPLERS)
    preset: null             # a published preset whose per-backbone rules apply
                             # (medfm.resolve.presets)

Presets build the published grids (PRESET_GRIDS, from medfm.resolve.presets: each detail and its
reference
line in docs/presets.md); `datasets`, `backbones` and `sizes` narrow them.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from medfm.data import DATASETS, check_size, get_dataset
from medfm.errors import InvalidArgumentError
from medfm.limits import (GRID_EXPANDED_MAX, GRID_SPEC_BYTES_MAX, GRID_SPEC_DEPTH_MAX,
                          check_list_length)
from medfm.preprocess import PreprocessRequest
from medfm.resolve.presets import FINETUNE, HEAD_PROBE, get_preset
from medfm.resolve.presets import PRESETS as PROTOCOLS
from medfm.resolve.defaults import PROBE_METHOD, RECIPE, SAMPLER, default_seeds
from medfm.resolve.methods import method_specs
from medfm.resolve.probe import resolve_probe
from medfm.resolve.defaults import SOLVERS
from medfm.resolve.store import STORE_DTYPES
from medfm.sampling import SAMPLERS, SubsetSpec, expand_subsets

TRAINED = (FINETUNE, HEAD_PROBE)  # methods that train through the fine-tune loop, not probes
DEFAULTS: dict[str, Any] = {  # spec fields a file may leave out
    "datasets": None, "weights": None, "fractions": (1.0,), "shots": (),
    "seeds": default_seeds("grid"), "methods": (PROBE_METHOD,), "probe_options": (),
    "solver": "auto", "selection": None,
    "resize_policy": None, "input_size": None, "normalize": None, "dtype": "float16",
    "device": None, "data_root": None, "recipe": RECIPE, "overrides": (),
    "sampler": SAMPLER, "preset": None,
}
REQUIRED = ("sizes", "backbones")
RENAMED = {"backend": "solver"}  # spec fields of earlier medfm versions


@dataclass(frozen=True)
class GridSpec:
    """Every axis of a benchmark grid; frozen and hashable, so it travels to workers as is."""

    datasets: tuple[str, ...] | None  # MedMNIST flags; None: every dataset with a file
    sizes: tuple[int, ...]  # 28 / 64 / 128 / 224
    backbones: tuple[str, ...]  # medfm aliases or timm names
    weights: str | None  # None: pretrained weights per backbone; "random"; or a checkpoint path
    fractions: tuple[float, ...]  # training fractions in (0, 1]
    shots: tuple[int, ...]  # labelled images per class
    seeds: tuple[int, ...]  # sampling and training seeds
    methods: tuple[str, ...]  # registered probe methods and/or "finetune"
    probe_options: tuple[tuple[str, Any], ...]  # probe methods' own settings, sorted pairs
    solver: str  # how logreg is fitted (medfm.probe.solvers.SOLVERS)
    selection: str | None  # probe model selection; None: each method's default
    resize_policy: str | None  # preprocessing of every job; None: the default
    input_size: int | None
    normalize: str | None
    dtype: str  # feature store dtype (STORE_DTYPES)
    device: str | None  # "cpu", "cuda" or None (auto)
    data_root: str | None  # where the npz files are
    recipe: str  # finetune recipe preset
    overrides: tuple[tuple[str, Any], ...]  # finetune recipe overrides, sorted (field, value)
    sampler: str = SAMPLERS[0]  # how training subsets are drawn (medfm.sampling)
    preset: str | None = None  # a published preset (medfm.resolve.presets) whose per-backbone rules
    #                            (input size, recipe settings) apply to every job

    @property
    def subsets(self) -> tuple[SubsetSpec, ...]:
        """Every (fraction or shots) x seed subset, fractions first."""
        return tuple(expand_subsets(self.fractions, self.shots, self.seeds,
                                    sampler=self.sampler))

    @property
    def probe_method_names(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m not in TRAINED)

    def probe_requests(self):
        """One resolved probe request per probe method (medfm.probe.resolve_probe): the spec's
        selection where the method supports it (else the method's default), and the method's
        own options from `probe_options`."""
        requests = []
        for name in self.probe_method_names:
            method = method_specs()[name]
            own = {o.name for o in method.options}
            selection = self.selection if self.selection in method.selections else None
            requests.append(resolve_probe(
                name, selection=selection, solver=self.solver, device=self.device,
                **{k: v for k, v in self.probe_options if k in own}))
        return tuple(requests)

    @property
    def preprocess(self) -> PreprocessRequest:
        """The grid's preprocessing request (for extract and fine-tune jobs alike)."""
        return PreprocessRequest(self.resize_policy, self.input_size, self.normalize)

    def preprocess_for(self, backbone) -> PreprocessRequest:
        """The preprocessing of `backbone`'s jobs: the preset's rule for it, with the spec's own
        fields on top; without a preset, the spec's."""
        if self.preset is None:
            return self.preprocess
        return get_preset(self.preset).preprocess(backbone).merged(self.preprocess)

    @property
    def precision(self) -> str | None:
        """How extract jobs compute: the preset's precision where it fixes one, else None (the
        device's default)."""
        return get_preset(self.preset).precision if self.preset is not None else None

    def recipe_overrides_for(self, backbone, *, frozen: bool) -> dict:
        """Recipe overrides of `backbone`'s fine-tunes: the preset's rule for it (if any), under
        the spec's own overrides; a head-probe also freezes the backbone."""
        rules = get_preset(self.preset).recipe_overrides(backbone, frozen=frozen) \
            if self.preset is not None else {}
        return {**rules, **dict(self.overrides), **({"freeze_backbone": True} if frozen else {})}

    def narrowed(self, *, datasets=None, backbones=None, sizes=None) -> GridSpec:
        """This spec restricted to the given datasets, backbones and sizes (None: keep all)."""
        changes = {}
        for name, chosen in (("datasets", datasets), ("backbones", backbones), ("sizes", sizes)):
            if chosen:
                changes[name] = tuple(chosen)
        return validate(replace(self, **changes))


def _tuple(name: str, value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, int, float)):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise InvalidArgumentError(f"spec field {name!r} must be a list, got {value!r}")


# what each listed field holds: YAML gives any type, and True is not the number 1 here
FIELD_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "datasets": ("MedMNIST flags, e.g. [breastmnist]", lambda v: isinstance(v, str)),
    "sizes": ("whole numbers among 28, 64, 128, 224", lambda v: _is_int(v)),
    "backbones": ("backbone names, e.g. [resnet18]", lambda v: isinstance(v, str)),
    "fractions": ("numbers in (0, 1], e.g. [0.01, 0.1, 1.0]",
                  lambda v: _is_real(v) or _is_number_text(v)),
    "shots": ("whole numbers >= 1, e.g. [1, 5, 10]", lambda v: _is_int(v)),
    "seeds": ("whole numbers >= 0, e.g. [0, 1, 2]", lambda v: _is_int(v)),
    "methods": ("method names, e.g. [logreg, finetune]", lambda v: isinstance(v, str)),
}
SCALAR_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {  # None is always allowed
    "weights": ("'random' or a checkpoint path", lambda v: isinstance(v, str)),
    "solver": ("a solver name", lambda v: isinstance(v, str)),
    "selection": ("val or holdout", lambda v: isinstance(v, str)),
    "resize_policy": ("a resize policy", lambda v: isinstance(v, str)),
    "input_size": ("a whole number of pixels", lambda v: _is_int(v)),
    "normalize": ("backbone or half", lambda v: isinstance(v, str)),
    "dtype": ("float16 or float32", lambda v: isinstance(v, str)),
    "device": ("cpu or cuda", lambda v: isinstance(v, str)),
    "data_root": ("a folder", lambda v: isinstance(v, (str, os.PathLike))),
    "recipe": ("a recipe name", lambda v: isinstance(v, str)),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_number_text(value: Any) -> bool:
    """A number PyYAML leaves as text: YAML 1.1 reads 1e-2 (no dot) as a string."""
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def _check_types(spec: GridSpec) -> None:
    """Every field holds values of its type (FIELD_TYPES, SCALAR_TYPES), before any is used."""
    for name, (wanted, ok) in FIELD_TYPES.items():
        values = getattr(spec, name)
        if values is None and name == "datasets":
            continue
        if not isinstance(values, (list, tuple)):
            raise InvalidArgumentError(f"spec field {name!r} must be a list of {wanted}; "
                                       f"got {values!r}")
        for value in values:
            if not ok(value):
                raise InvalidArgumentError(f"spec field {name!r} holds {value!r}; it takes "
                                           f"{wanted}")
    for name, (wanted, ok) in SCALAR_TYPES.items():
        value = getattr(spec, name)
        if value is not None and not ok(value):
            raise InvalidArgumentError(f"spec field {name!r} is {value!r}; it takes {wanted}")


def _choice(name: str, value: Any, choices) -> str:
    if value not in choices:
        raise InvalidArgumentError(
            f"spec field {name}={value!r} is not one of {', '.join(map(str, choices))}"
        )
    return value


def _once(values) -> tuple | None:
    """`values` in their order with repeats dropped (None stays None)."""
    return None if values is None else tuple(dict.fromkeys(values))


def _check_expansion(spec: GridSpec) -> None:
    """Every list within LIST_MAX values, and the grid's jobs (an upper bound: every dataset x
    size x backbone x subset x method) within GRID_EXPANDED_MAX, counted before any is built."""
    for name in FIELD_TYPES:
        values = getattr(spec, name)
        if values is not None:
            check_list_length(len(values), f"spec field {name!r}")
    n_datasets = len(spec.datasets) if spec.datasets is not None else len(DATASETS)
    jobs = (n_datasets * len(spec.sizes) * len(spec.backbones) * len(spec.methods)
            * (len(spec.fractions) + len(spec.shots)) * len(spec.seeds))
    if jobs > GRID_EXPANDED_MAX:
        raise InvalidArgumentError(
            f"the grid expands to up to {jobs:,} jobs, above medfm's limit of "
            f"{GRID_EXPANDED_MAX:,} (README, Guarantees); split it into smaller grids.")


def validate(spec: GridSpec) -> GridSpec:
    """Check every axis (without loading data or models) and normalize names and types.

    Names are resolved (datasets, backbones) when the grid is planned, before anything runs.
    """
    _check_types(spec)
    for name in REQUIRED:
        if not getattr(spec, name):
            raise InvalidArgumentError(f"spec field {name!r} is empty; list at least one value")
    datasets = None if spec.datasets is None else tuple(
        get_dataset(d, spec.data_root).flag for d in spec.datasets)
    sizes = tuple(check_size(s) for s in spec.sizes)
    methods = method_specs()
    for method in spec.methods:
        _choice("methods", method, (*methods, *TRAINED))
    if not spec.methods:
        raise InvalidArgumentError(f"spec field 'methods' is empty; use some of "
                                   f"{', '.join((*methods, *TRAINED))}")
    _choice("sampler", spec.sampler, SAMPLERS)
    if spec.preset is not None:
        get_preset(spec.preset)
    if not spec.fractions and not spec.shots:
        raise InvalidArgumentError("spec gives neither fractions nor shots; give one of them")
    if not spec.seeds:
        raise InvalidArgumentError("spec field 'seeds' is empty; e.g. seeds: [0, 1, 2]")
    # one value per run: a value listed twice (or two spellings of one dataset) is one axis value
    spec = replace(spec, datasets=_once(datasets), sizes=_once(sizes),
                   fractions=_once(float(f) for f in spec.fractions),
                   shots=_once(int(k) for k in spec.shots),
                   seeds=_once(int(s) for s in spec.seeds),
                   methods=_once(spec.methods),
                   backbones=_once(str(b) for b in spec.backbones))
    _check_expansion(spec)
    spec.subsets  # noqa: B018 - SubsetSpec validates each fraction, shot count and seed
    spec.preprocess  # noqa: B018 - PreprocessRequest validates policy, size, normalization
    _choice("solver", spec.solver, SOLVERS)
    _choice("dtype", spec.dtype, STORE_DTYPES)
    known_options = {o.name for m in methods.values() for o in m.options}
    for name, _ in spec.probe_options:
        _choice("probe_options", name, sorted(known_options))
    spec.probe_requests()  # checks each method's selection and options
    if set(TRAINED) & set(spec.methods):
        from medfm.resolve.recipes import resolve_recipe  # checks the recipe before any job runs

        resolve_recipe(spec.recipe, **dict(spec.overrides))
    return spec


def spec_from_dict(raw: dict[str, Any]) -> GridSpec:
    """A GridSpec from a parsed YAML mapping (see the module docstring for the fields)."""
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"a grid spec is a mapping of fields; got {type(raw).__name__}")
    raw = {RENAMED.get(k, k): v for k, v in raw.items()}
    finetune = raw.pop("finetune", None) or {}
    if not isinstance(finetune, dict) or set(finetune) - {"recipe", "overrides"}:
        raise InvalidArgumentError(
            "spec field 'finetune' takes {recipe: NAME, overrides: {field: value}}"
        )
    raw["recipe"] = finetune.get("recipe", DEFAULTS["recipe"])
    raw["overrides"] = tuple(sorted((finetune.get("overrides") or {}).items()))
    options = raw.get("probe_options") or {}
    if not isinstance(options, dict):
        raise InvalidArgumentError("spec field 'probe_options' takes {option: value}")
    raw["probe_options"] = tuple(sorted(options.items()))
    known = [f.name for f in fields(GridSpec)]
    for name in raw:
        if name not in known:
            close = difflib.get_close_matches(name, [*known, "finetune"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InvalidArgumentError(f"unknown spec field {name!r}{hint}")
    for name in REQUIRED:
        if name not in raw:
            raise InvalidArgumentError(f"spec lacks {name!r}; list the {name} to run")
    values = {**DEFAULTS, **raw}
    listed = ("sizes", "backbones", "fractions", "shots", "seeds", "methods")
    for name in listed:
        values[name] = _tuple(name, values[name])
    if values["datasets"] is not None:
        values["datasets"] = _tuple("datasets", values["datasets"])
    if values["data_root"] is not None:
        values["data_root"] = str(values["data_root"])
    return validate(GridSpec(**values))


def load_spec(path: str | os.PathLike) -> GridSpec:
    """Read and validate a YAML grid spec; a relative data_root is taken from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"grid spec {path} does not exist; pass a YAML file")
    if path.stat().st_size > GRID_SPEC_BYTES_MAX:
        raise InvalidArgumentError(
            f"grid spec {path} is {path.stat().st_size:,} bytes, above medfm's limit of "
            f"{GRID_SPEC_BYTES_MAX:,} (README, Guarantees); a grid spec lists axes, not data")
    try:
        text = path.read_text(encoding="utf-8")
        _check_depth(text, path)
        raw = yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"grid spec {path} is not UTF-8 text (byte {exc.start}: "
                                   f"{exc.reason}); save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        why = " ".join(str(exc).split())  # PyYAML's message spans several lines
        raise InvalidArgumentError(f"grid spec {path} is not valid YAML ({why})") from None
    spec = spec_from_dict(raw)
    if spec.data_root is not None and not Path(spec.data_root).expanduser().is_absolute():
        spec = replace(spec, data_root=str((path.parent / spec.data_root).resolve()))
    return spec


def _check_depth(text: str, path: Path) -> None:
    """Lists and mappings nest at most GRID_SPEC_DEPTH_MAX deep, counted on PyYAML's event
    stream (a loop, so a spec nested thousands deep never reaches the recursive composer)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > GRID_SPEC_DEPTH_MAX:
                raise InvalidArgumentError(
                    f"grid spec {path} nests lists or mappings more than "
                    f"{GRID_SPEC_DEPTH_MAX} deep (line {event.start_mark.line + 1}); a grid "
                    "spec is a mapping of flat lists")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _preset_grid(name: str) -> GridSpec:
    """The grid of the published preset `name` (medfm.resolve.presets): its backbones, sizes,
    subsets,
    seeds, sampler, methods, probe options, preprocessing, store dtype and recipe; its
    per-backbone rules apply through `preset`."""
    p = PROTOCOLS[name]
    return GridSpec(
        datasets=None, sizes=p.sizes, backbones=p.backbones, weights=None,
        fractions=p.fractions, shots=p.shots, seeds=p.seeds, methods=p.methods,
        probe_options=p.probe_settings, solver="auto", selection=None,
        resize_policy=p.resize_policy, input_size=p.input_size, normalize=None, dtype=p.dtype,
        device=None, data_root=None, recipe=p.recipe, overrides=(), sampler=p.sampler,
        preset=name)


# the published grids; medfm adds its cached logistic-regression probe (logreg) to each
PRESET_GRIDS: dict[str, GridSpec] = {name: _preset_grid(name) for name in PROTOCOLS}


def preset_spec(name: str, *, datasets=None, backbones=None, sizes=None,
                data_root: str | None = None) -> GridSpec:
    """The published grid `name` (PRESET_GRIDS), narrowed to the given datasets, backbones and
    sizes."""
    if name not in PRESET_GRIDS:
        close = difflib.get_close_matches(name, PRESET_GRIDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InvalidArgumentError(
            f"unknown grid preset {name!r}{hint}; use one of {', '.join(PRESET_GRIDS)}"
        )
    spec = PRESET_GRIDS[name]
    if data_root is not None:
        spec = replace(spec, data_root=str(data_root))
    return spec.narrowed(datasets=datasets, backbones=backbones, sizes=sizes)
