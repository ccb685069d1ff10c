"""Result keys: exactly the fields that change a run's result, and their canonical JSON.

    from medfm.resolve.keys import ResultKey, run_key, canonical_json
    key = run_key(store=store_request.identity(), store_fingerprint=fp, method="logreg",
                  params={"C_grid": ...}, selection="val", select_metric="loss",
                  spec=SubsetSpec(fraction=0.1, seed=0))
    key.digest()   # sha256 of the key's canonical JSON: the registry's primary key

Identity. A run is identified by a `ResultKey` (`RESULT_KEY_FIELDS`). `ResultKey.digest()` is the
sha256 of the key's canonical JSON (sorted keys, no whitespace, Python's shortest round-trip float
repr, `params` re-serialized the same way), so the same run gets the same digest in every process,
on every machine, whatever the key order of its method settings.

A store's file name is the first STORE_DIGEST_CHARS hex digits of the sha256 of its identity's
canonical JSON (`store_digest`, `store_filename`). Key fields and settings added after the first
release are keyed only where they differ from the value that meant "as before"
(medfm.resolve.defaults.LATER_KEY_FIELDS), so every key written before stays the key of the same
run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medfm.errors import InvalidArgumentError
from medfm.resolve.defaults import EPISODE_KEY_FIELDS, SAMPLER_PARAM, keyed_later
from medfm.sampling import SubsetSpec, episode_params

if TYPE_CHECKING:
    from medfm.backbones.names import BackboneRef
    from medfm.data import DatasetRef
    from medfm.preprocess import PreprocessConfig

STORES_DIRNAME = "stores"  # <workdir>/stores/*.h5
PARTIAL_SUFFIX = ".partial"  # a store being built: <name>.h5.partial
STORE_DIGEST_CHARS = 16  # hex digits of a store request's digest in its file name
SELECTIONS = ("val", "holdout", "none")  # what chose hyper-parameters or the checkpoint
SELECT_METRICS = ("acc", "auc", "loss", "")  # what that choice maximized ("" when nothing)


def canonical_json(value: Any) -> str:
    """`value` as canonical JSON: sorted keys, no whitespace, shortest float repr, no NaN."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        where, bad = _not_json(value)
        if not where:  # not a value's fault (e.g. a reference cycle): name its type only
            where, bad = "value", type(value).__name__
        raise InvalidArgumentError(
            f"cannot store {where}={bad!r} as JSON ({exc}); give a finite number or a plain "
            "str/int/float/bool/list/dict value"
        ) from exc


def _not_json(value: Any, where: str = "value") -> tuple[str, Any]:
    """(path, value) of the first part of `value` that canonical JSON refuses (NaN, inf, an
    object), so the error names the field instead of quoting the whole value."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _not_json(item, str(key) if where == "value" else f"{where}.{key}")
            if found[0]:
                return found
        return "", None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _not_json(item, f"{where}[{i}]")
            if found[0]:
                return found
        return "", None
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    if value is None or isinstance(value, (str, int, float)):
        return "", None
    return where, value


@dataclass(frozen=True, kw_only=True)
class ResultKey:
    """Exactly the fields that change a result; two runs with equal keys are the same run.

    Built by medfm.resolve from a resolved request (before any model or feature loads), so
    every spelling of the same run gets the same key. How a run was computed (solver, device)
    is not part of it: those are recorded with the row.
    """

    dataset: str  # MedMNIST flag, e.g. "breastmnist"
    size: int  # source image size: 28, 64, 128 or 224
    data_digest: str  # MD5 of the dataset file the images came from
    backbone: str  # canonical timm id, arch.tag, e.g. "resnet18.a1_in1k"
    weights: str  # "pretrained", "random" or "file:<sha256/16>" (medfm.backbones.names)
    resize_policy: str  # bilinear | bicubic | pad | nearest | native
    input_size: int  # side length fed to the backbone
    normalize: str  # "backbone" (its mean/std) or "half" (mean = std = 0.5)
    feature_kind: str  # what a probe read, e.g. "prelogits" ("" for finetune)
    method: str  # "logreg", "knn", "finetune", ...
    params: str = "{}"  # method settings as JSON (C grid, k, recipe...); canonicalized
    selection: str  # what chose hyper-parameters or the checkpoint: "val", "holdout" or "none"
    select_metric: str  # the metric it maximized (minimized for loss): acc | auc | loss | ""
    fraction: float | None = None  # share of the training set (None: shots-based)
    shots: int | None = None  # labelled images per class (None: fraction-based)
    seed: int  # sampling and training seed
    store_fingerprint: str = ""  # content fingerprint of the feature store read ("" finetune)

    def __post_init__(self) -> None:
        """Normalize types so equal runs compare and hash equal."""
        try:
            params = json.loads(self.params)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"ResultKey.params must be a JSON string, got {self.params!r}; "
                "build it with medfm.resolve.keys.canonical_json(settings)"
            ) from exc
        normalized = {
            "size": int(self.size),
            "input_size": int(self.input_size),
            "seed": int(self.seed),
            "fraction": None if self.fraction is None else float(self.fraction),
            "shots": None if self.shots is None else int(self.shots),
            "params": canonical_json(params),
        }
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        """The key fields by name, in RESULT_KEY_FIELDS order."""
        return {name: getattr(self, name) for name in RESULT_KEY_FIELDS}

    def digest(self) -> str:
        """sha256 hex of the canonical JSON of all key fields (the registry's primary key)."""
        return hashlib.sha256(canonical_json(self.as_dict()).encode("utf-8")).hexdigest()


RESULT_KEY_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ResultKey))


def input_identity(dataset: DatasetRef, backbone: BackboneRef, preprocess: PreprocessConfig,
                   normalize: str) -> dict[str, Any]:
    """What a backbone is shown of a dataset: the images, the network and weights, and how
    images are prepared. Shared by extractions and fine-tunes (their `run_key` store)."""
    return {"dataset": dataset.name, "size": dataset.size, "data_digest": dataset.digest,
            "backbone": backbone.id, "weights": backbone.weights,
            "resize_policy": preprocess.resize_policy, "input_size": preprocess.input_size,
            "mean": list(preprocess.mean), "std": list(preprocess.std), "normalize": normalize}


def store_digest(identity: dict[str, Any]) -> str:
    """First STORE_DIGEST_CHARS hex digits of the sha256 of a store identity's canonical JSON."""
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:STORE_DIGEST_CHARS]


def store_filename(identity: dict[str, Any]) -> str:
    """`<dataset>_<size>__<backbone>__<policy><input>__<kind>-<dtype>__<digest>.h5`."""
    i = identity
    return (f"{i['dataset']}_{i['size']}__{i['backbone']}__{i['resize_policy']}{i['input_size']}"
            f"__{i['feature_kind']}-{i['dtype']}__{store_digest(i)}.h5")



def run_key(
    *,
    store: dict[str, Any],
    method: str,
    params: dict[str, Any],
    selection: str,
    select_metric: str,
    spec: SubsetSpec,
    store_fingerprint: str = "",
    feature_kind: str | None = None,
) -> ResultKey:
    """The registry key of one run.

    `store` is a store identity (`StoreRequest.identity()`, or what a finished store records):
    for a probe, the features it reads; for a fine-tune, its `input_identity` (dataset, backbone,
    preprocessing) with `feature_kind=""`, since it reads images. A subset drawn by a sampler
    mode other than the default (medfm.sampling.SAMPLERS) adds it to `params` as "sampler".
    """
    if selection not in SELECTIONS:
        raise InvalidArgumentError(f"selection {selection!r} is not one of {SELECTIONS}.")
    params = keyed_later(params, SAMPLER_PARAM, spec.sampler)  # keyed only where not default
    episode = episode_params(spec)  # few-shot episodes only (medfm.episodes)
    for name in EPISODE_KEY_FIELDS:
        params = keyed_later(params, name, episode.get(name))
    if select_metric not in SELECT_METRICS:
        raise InvalidArgumentError(
            f"selection metric {select_metric!r} is not one of {SELECT_METRICS}.")
    return ResultKey(
        dataset=store["dataset"], size=store["size"], data_digest=store["data_digest"],
        backbone=store["backbone"], weights=store["weights"],
        resize_policy=store["resize_policy"], input_size=store["input_size"],
        normalize=store["normalize"],
        feature_kind=store["feature_kind"] if feature_kind is None else feature_kind,
        method=method, params=canonical_json(params), selection=selection,
        select_metric=select_metric, fraction=spec.fraction, shots=spec.shots, seed=spec.seed,
        store_fingerprint=store_fingerprint)
