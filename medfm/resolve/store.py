"""Store requests: which images, through which backbone, prepared how, stored how.

    from medfm.resolve import resolve_store_request
    store = resolve_store_request(dataset="breastmnist", size=28, backbone="resnet18")
    store.path(workdir).exists()     # is this extraction done? one stat, no scan

- A dataset resolves to a `DatasetRef` (flag, size, the MD5 of its file; medfm.data) and a
  backbone to a `BackboneRef` (canonical timm id, weights identity; medfm.backbones), so an
  alias, a bare timm architecture and its tagged id are one backbone.
- Preprocessing resolves from one `PreprocessRequest` (medfm.preprocess) against the backbone's
  data config, read from medfm's snapshot of timm's registry.
- An extraction is a `StoreRequest`; its digest names the store file, so finding a finished
  store is one file-system lookup. How it computes (float32, or bfloat16 autocast: CUDA's
  default) is part of it, so a partial store is only ever resumed in its own precision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfm.backbones.names import BackboneRef, resolve_backbone
from medfm.data import DatasetRef, resolve_dataset
from medfm.errors import InvalidArgumentError
from medfm.preprocess import DEFAULT_NORMALIZATION, PreprocessConfig, PreprocessRequest
from medfm.runtime import PRECISIONS, resolve_precision
from medfm.resolve.keys import STORES_DIRNAME, input_identity, store_digest, store_filename

FEATURE_KIND = "prelogits"  # timm forward_head(forward_features(x), pre_logits=True): pooled
STORE_DTYPES = ("float16", "float32")  # float16 halves the disk; probes upcast to float32


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
