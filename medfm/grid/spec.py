"""Grid specs: a YAML file (or a named preset) -> one validated, frozen `GridSpec`.

    from medfm.grid.spec import load_spec, preset_spec
    spec = load_spec("examples/grid_demo.yaml")
    spec = preset_spec("seed-paper", datasets=["breastmnist"], sizes=[28])

A spec file names the axes of the grid; everything but `datasets`, `sizes` and `backbones` has a
default (DEFAULTS):

    datasets: [breastmnist, pneumoniamnist]
    sizes: [28, 64]
    backbones: [resnet18, dino_vitb16]
    weights: null            # null: each backbone's default source; "random" or a file path
    fractions: [0.01, 0.1, 1.0]
    shots: []                # labelled images per class, instead of / besides fractions
    seeds: [0, 1, 2]
    methods: [logreg, finetune]   # logreg | knn | finetune
    backend: auto            # probe backend: auto | sklearn | torch | cuml
    selection: val           # probe C selection: val | holdout
    resize_policy: null      # null: the backbone's default; bilinear|bicubic|pad|nearest|native
    input_size: null
    dtype: float16           # feature store dtype
    device: null             # null: CUDA when visible, else CPU
    data_root: null          # null: $MEDFM_DATA_ROOT or ~/.medmnist
    finetune: {recipe: medfm, overrides: {epochs: 5}}

Presets build the published grids (see PRESETS); `datasets`, `backbones` and `sizes` narrow them.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from medfm.data import DATASETS, check_size, get_dataset
from medfm.errors import InvalidArgumentError
from medfm.preprocess import check_resize_policy
from medfm.probe.settings import SELECTIONS
from medfm.sampling import SubsetSpec
from medfm.store.features import STORE_DTYPES
from medfm.store.registry import METHODS

PROBE_METHODS = ("logreg", "knn")  # methods that read feature stores
PROBE_BACKENDS = ("auto", "sklearn", "torch", "cuml")
DEFAULTS: dict[str, Any] = {  # spec fields a file may leave out
    "weights": None, "fractions": (1.0,), "shots": (), "seeds": (0,), "methods": ("logreg",),
    "backend": "auto", "selection": "val", "resize_policy": None, "input_size": None,
    "dtype": "float16", "device": None, "data_root": None, "recipe": "medfm", "overrides": (),
}
REQUIRED = ("datasets", "sizes", "backbones")


@dataclass(frozen=True)
class GridSpec:
    """Every axis of a benchmark grid; frozen and hashable, so it travels to workers as is."""

    datasets: tuple[str, ...]  # MedMNIST flags
    sizes: tuple[int, ...]  # 28 / 64 / 128 / 224
    backbones: tuple[str, ...]  # medfm aliases or timm names
    weights: str | None  # None: default source per backbone; "random"; or a checkpoint path
    fractions: tuple[float, ...]  # training fractions in (0, 1]
    shots: tuple[int, ...]  # labelled images per class
    seeds: tuple[int, ...]  # sampling and training seeds
    methods: tuple[str, ...]  # subset of registry METHODS
    backend: str  # probe backend (PROBE_BACKENDS)
    selection: str  # probe C selection (SELECTIONS)
    resize_policy: str | None  # store resize policy; None = the backbone's default
    input_size: int | None  # store input size; None = the backbone's
    dtype: str  # feature store dtype (STORE_DTYPES)
    device: str | None  # "cpu", "cuda" or None (auto)
    data_root: str | None  # where the npz files are
    recipe: str  # finetune recipe preset
    overrides: tuple[tuple[str, Any], ...]  # finetune recipe overrides, sorted (field, value)

    @property
    def subsets(self) -> tuple[SubsetSpec, ...]:
        """Every (fraction or shots) x seed subset, fractions first."""
        return tuple(
            [SubsetSpec(fraction=f, seed=s) for f in self.fractions for s in self.seeds]
            + [SubsetSpec(shots=k, seed=s) for k in self.shots for s in self.seeds]
        )

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


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidArgumentError(
            f"spec field {name}={value!r} is not one of {', '.join(choices)}"
        )
    return value


def validate(spec: GridSpec) -> GridSpec:
    """Check every axis (without loading data or models) and normalize names and types.

    Backbones are not resolved here: an unknown backbone fails its own jobs, not the grid.
    """
    for name in REQUIRED:
        if not getattr(spec, name):
            raise InvalidArgumentError(f"spec field {name!r} is empty; list at least one value")
    datasets = tuple(get_dataset(d).flag for d in spec.datasets)
    sizes = tuple(check_size(int(s)) for s in spec.sizes)
    for method in spec.methods:
        _choice("methods", method, METHODS)
    if not spec.methods:
        raise InvalidArgumentError(f"spec field 'methods' is empty; use some of {METHODS}")
    if not spec.fractions and not spec.shots:
        raise InvalidArgumentError("spec gives neither fractions nor shots; give one of them")
    if not spec.seeds:
        raise InvalidArgumentError("spec field 'seeds' is empty; e.g. seeds: [0, 1, 2]")
    spec = replace(spec, datasets=datasets, sizes=sizes,
                   fractions=tuple(float(f) for f in spec.fractions),
                   shots=tuple(int(k) for k in spec.shots),
                   seeds=tuple(int(s) for s in spec.seeds),
                   backbones=tuple(str(b) for b in spec.backbones))
    spec.subsets  # noqa: B018 - SubsetSpec validates each fraction, shot count and seed
    _choice("backend", spec.backend, PROBE_BACKENDS)
    _choice("selection", spec.selection, SELECTIONS)
    _choice("dtype", spec.dtype, STORE_DTYPES)
    if spec.resize_policy is not None:
        check_resize_policy(spec.resize_policy)
    if "finetune" in spec.methods:
        from medfm.finetune import resolve_recipe  # checks the recipe before any job runs

        resolve_recipe(spec.recipe, **dict(spec.overrides))
    return spec


def spec_from_dict(raw: dict[str, Any]) -> GridSpec:
    """A GridSpec from a parsed YAML mapping (see the module docstring for the fields)."""
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"a grid spec is a mapping of fields; got {type(raw).__name__}")
    raw = dict(raw)
    finetune = raw.pop("finetune", None) or {}
    if not isinstance(finetune, dict) or set(finetune) - {"recipe", "overrides"}:
        raise InvalidArgumentError(
            "spec field 'finetune' takes {recipe: NAME, overrides: {field: value}}"
        )
    raw["recipe"] = finetune.get("recipe", DEFAULTS["recipe"])
    raw["overrides"] = tuple(sorted((finetune.get("overrides") or {}).items()))
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
    listed = ("datasets", "sizes", "backbones", "fractions", "shots", "seeds", "methods")
    for name in listed:
        values[name] = _tuple(name, values[name])
    if values["data_root"] is not None:
        values["data_root"] = str(values["data_root"])
    return validate(GridSpec(**values))


def load_spec(path: str | os.PathLike) -> GridSpec:
    """Read and validate a YAML grid spec; a relative data_root is taken from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"grid spec {path} does not exist; pass a YAML file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InvalidArgumentError(f"grid spec {path} is not valid YAML ({exc})") from exc
    spec = spec_from_dict(raw)
    if spec.data_root is not None and not Path(spec.data_root).expanduser().is_absolute():
        spec = replace(spec, data_root=str((path.parent / spec.data_root).resolve()))
    return spec


ALL_DATASETS = tuple(DATASETS)
MEDMNIST_SIZES = (28, 64, 128, 224)
PAPER_SEEDS = (0, 1, 2)
# Wu & Papiez 2025 (ANCHORS.md): their model zoo as medfm aliases, bilinear upsampling, AdamW
# head+backbone training for 15k iterations (recipe "seed-paper"), seeds 0-2; medfm adds a tuned
# logistic-regression probe on cached features and the fraction axis of DESIGN.md.
SEED_PAPER_BACKBONES = (
    "vgg16", "resnet18", "densenet121", "efficientnet_b4", "inception_v3", "inception_resnet_v2",
    "vit_b16", "clip_vitb16_laion2b", "clip_vitb16_openai_ft", "clip_vitb16_openai",
    "eva02_vitb14", "dino_vitb16", "dino_vits16", "dinov2_vits14", "dinov2_vitb14", "sam_vitb16",
    "sam_in1k_vitb16",
)
# Doerrich et al. 2025: the timm-available part of their zoo (AlexNet is not in timm), zero-pad
# into 224, linear probe + kNN (k=11) + end-to-end (recipe "medmnist-plus"), full training sets.
MEDMNIST_PLUS_BACKBONES = (
    "vgg16", "resnet18", "densenet121", "efficientnet_b4", "vit_b16", "clip_vitb16_openai",
    "eva02_vitb14", "dino_vitb16", "sam_vitb16",
)
PRESETS: dict[str, GridSpec] = {
    "seed-paper": GridSpec(
        datasets=ALL_DATASETS, sizes=MEDMNIST_SIZES, backbones=SEED_PAPER_BACKBONES,
        weights=None, fractions=(0.01, 0.1, 1.0), shots=(), seeds=PAPER_SEEDS,
        methods=("logreg", "finetune"), backend="auto", selection="val",
        resize_policy="bilinear", input_size=None, dtype="float16", device=None, data_root=None,
        recipe="seed-paper", overrides=(),
    ),
    "medmnist-plus": GridSpec(
        datasets=ALL_DATASETS, sizes=MEDMNIST_SIZES, backbones=MEDMNIST_PLUS_BACKBONES,
        weights=None, fractions=(1.0,), shots=(), seeds=PAPER_SEEDS,
        methods=("logreg", "knn", "finetune"), backend="auto", selection="val",
        resize_policy="pad", input_size=224, dtype="float16", device=None, data_root=None,
        recipe="medmnist-plus", overrides=(),
    ),
}


def preset_spec(name: str, *, datasets=None, backbones=None, sizes=None,
                data_root: str | None = None) -> GridSpec:
    """The published grid `name` (PRESETS), narrowed to the given datasets, backbones, sizes."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InvalidArgumentError(
            f"unknown grid preset {name!r}{hint}; use one of {', '.join(PRESETS)}"
        )
    spec = PRESETS[name]
    if data_root is not None:
        spec = replace(spec, data_root=str(data_root))
    return spec.narrowed(datasets=datasets, backbones=backbones, sizes=sizes)
