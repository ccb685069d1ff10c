"""One resolution step per run: what the user typed -> a canonical, frozen request -> its key.

    from medfm.request import resolve_store_request, run_key
    store = resolve_store_request(dataset="breastmnist", size=28, backbone="resnet18")
    store.path(workdir).exists()     # is this extraction done? one stat, no scan
    key = run_key(store=store.identity(), store_fingerprint=fp, method="logreg", params=...,
                  selection="val", select_metric="acc", spec=SubsetSpec(fraction=0.1, seed=0))

Every stage decides "is this done?" here and nowhere else, before any model, feature or image
is loaded:

- A dataset resolves to a `DatasetRef` (flag, size, the MD5 of its file; medfm.data) and a
  backbone to a `BackboneRef` (canonical timm id, weights identity; medfm.backbones.names), so
  an alias, a bare timm architecture and its tagged id are one backbone.
- Preprocessing resolves from one `PreprocessRequest` (medfm.preprocess) against the backbone's
  data config, read from medfm's snapshot of timm's registry.
- An extraction is a `StoreRequest`; its digest names the store file, so finding a finished
  store is one file-system lookup. How it computes (float32, or bfloat16 autocast: CUDA's
  default) is part of it, so a partial store is only ever resumed in its own precision.
- A probe or fine-tune run is a `ResultKey` (medfm.store.registry) built by `run_key` from the
  same parts plus the method, its settings, the model-selection rule and the training subset;
  a probe's key also carries the content fingerprint of the store it read. The registry
  answers "done?" for any number of keys in one query.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfm.backbones.names import BackboneRef, resolve_backbone
from medfm.data import DatasetRef, resolve_dataset
from medfm.errors import InvalidArgumentError
from medfm.preprocess import DEFAULT_NORMALIZATION, PreprocessConfig, PreprocessRequest
from medfm.runtime import PRECISIONS, resolve_precision
from medfm.sampling import SAMPLERS, SubsetSpec, episode_params
from medfm.store.registry import ResultKey, canonical_json

FEATURE_KIND = "prelogits"  # timm forward_head(forward_features(x), pre_logits=True): pooled
STORE_DTYPES = ("float16", "float32")  # float16 halves the disk; probes upcast to float32
STORES_DIRNAME = "stores"  # <workdir>/stores/*.h5
STORE_DIGEST_CHARS = 16  # hex digits of a store request's digest in its file name
SELECTIONS = ("val", "holdout", "none")  # what chose hyper-parameters or the checkpoint
SELECT_METRICS = ("acc", "auc", "loss", "")  # what that choice maximized ("" when nothing)
SAMPLER_PARAM = "sampler"  # a run key's params name a sampler mode other than the default here


@dataclass(frozen=True)
class StoreRequest:
    """One extraction: which images, through which backbone, prepared how, stored how."""

    dataset: DatasetRef
    backbone: BackboneRef
    preprocess: PreprocessConfig  # resolved against the backbone's data config
    normalize: str = DEFAULT_NORMALIZATION  # how preprocess's mean/std were chosen
    feature_kind: str = FEATURE_KIND
    dtype: str = "float16"  # one of STORE_DTYPES: how features are stored
    precision: str = "float32"  # one of medfm.runtime.PRECISIONS: how they are computed

    def __post_init__(self) -> None:
        if self.dtype not in STORE_DTYPES:
            raise InvalidArgumentError(
                f"dtype {self.dtype!r} is not one of {', '.join(STORE_DTYPES)}.")
        if self.precision not in PRECISIONS:
            raise InvalidArgumentError(
                f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}.")

    def identity(self) -> dict[str, Any]:
        """The request as plain data: what a store records and a probe's key is built from.

        The precision is named only where it is not float32, so every float32 store made
        before it was part of the identity keeps its name, and a store computed in one
        precision is never resumed or reused by a run in another."""
        identity = {**input_identity(self.dataset, self.backbone, self.preprocess,
                                     self.normalize),
                    "feature_kind": self.feature_kind, "dtype": self.dtype}
        if self.precision != "float32":
            identity["precision"] = self.precision
        return identity

    def digest(self) -> str:
        return store_digest(self.identity())

    def filename(self) -> str:
        return store_filename(self.identity())

    def path(self, workdir: str | os.PathLike) -> Path:
        """Where the finished store for this request lives in `workdir` (see stores_dir)."""
        return Path(workdir) / STORES_DIRNAME / self.filename()


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


def resolve_store_request(
    *,
    dataset: str | DatasetRef,
    backbone: str | BackboneRef,
    size: int | None = None,
    weights: str | None = None,
    preprocess: PreprocessRequest | None = None,
    dtype: str = "float16",
    data_root: str | os.PathLike | None = None,
    precision: str | None = None,
    device: str | None = None,
) -> StoreRequest:
    """The extraction the user asked for, resolved without loading the model or the images.

    `dataset` is a flag (with `size`) or a resolved ref; `backbone` a name (with `weights`) or a
    resolved ref; `preprocess` the user's request (None: the backbone's defaults); `precision`
    float32, bfloat16, or None / "auto": bfloat16 where `device` (None: a visible GPU) is CUDA.
    """
    ref = dataset if isinstance(dataset, DatasetRef) else resolve_dataset(dataset, size, data_root)
    model = backbone if isinstance(backbone, BackboneRef) else resolve_backbone(backbone, weights)
    request = preprocess or PreprocessRequest()
    config = request.resolve(model.data_config(), source_size=ref.size)
    return StoreRequest(ref, model, config, request.normalize or DEFAULT_NORMALIZATION,
                        FEATURE_KIND, dtype, resolve_precision(precision, device))


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
    if spec.sampler != SAMPLERS[0]:  # keyed only where it is not the default: earlier keys stay
        params = {**params, SAMPLER_PARAM: spec.sampler}
    params = {**params, **episode_params(spec)}  # few-shot episodes only (medfm.episodes)
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
