"""HDF5 feature stores: one file per (dataset, size, backbone+tag+weights, resize policy, input
size, feature kind, dtype), holding every split's frozen-backbone features.

    store = FeatureStore("medfm-work/stores/breastmnist_28__...h5")   # opens and verifies
    X = store.features("train")          # (N, D) float32 (stored float16 by default)
    y = store.labels("train")            # (N, L) as in the npz

Layout: groups `train`, `val`, `test`, each with `features` (N, D), `labels` (N, L) and `index`
(N,) (row -> position in the npz split); file attributes carry the full provenance and a content
fingerprint. A store is built as `<name>.h5.partial`: rows land chunk by chunk, each chunk
flushed before the split's `rows_done` counter moves past it, so a killed extraction resumes from
the last complete chunk. When every split is full the fingerprint is written and the file is
renamed to `<name>.h5` in one atomic step: a `.h5` file is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from medfm.data import SPLITS
from medfm.errors import StoreError
from medfm.paths import resolve_workdir

FORMAT_VERSION = 1  # bump when the layout changes; older stores then ask to be rebuilt
FEATURE_KIND = "prelogits"  # timm forward_head(forward_features(x), pre_logits=True): pooled
STORE_DTYPES = ("float16", "float32")  # float16 halves the disk; probes upcast to float32
STORES_DIRNAME = "stores"  # <workdir>/stores/*.h5
PARTIAL_SUFFIX = ".partial"  # a store being built: <name>.h5.partial
FLOAT16_MAX = 65504.0  # features beyond this are clipped (and counted) when stored as float16


@dataclass(frozen=True)
class StoreKey:
    """Everything that changes a store's content; its digest names the file."""

    dataset: str  # MedMNIST flag
    size: int  # source image size (28/64/128/224)
    arch: str  # timm architecture
    tag: str  # timm pretrained tag, "" if none
    weights_digest: str  # digest of the loaded weights (see backbones.py)
    resize_policy: str  # see preprocess.RESIZE_POLICIES
    input_size: int  # model input side, pixels
    feature_kind: str = FEATURE_KIND  # which features
    dtype: str = "float16"  # storage dtype

    @property
    def backbone(self) -> str:
        """timm id with tag, e.g. "tf_efficientnet_lite0.in1k"."""
        return f"{self.arch}.{self.tag}" if self.tag else self.arch

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def filename(self) -> str:
        return (
            f"{self.dataset}_{self.size}__{self.backbone}__{self.resize_policy}{self.input_size}"
            f"__{self.feature_kind}-{self.dtype}__{self.digest()}.h5"
        )


def stores_dir(workdir: str | os.PathLike | None = None) -> Path:
    path = resolve_workdir(workdir) / STORES_DIRNAME
    path.mkdir(parents=True, exist_ok=True)
    return path


def _rebuild_hint(path: Path) -> str:
    return (f"delete {path} and run `medfm extract` again (or rerun it with --force) "
            f"to rebuild it")


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


class FeatureStore:
    """A complete, verified feature store, opened read-only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(
                f"feature store {self.path} does not exist; run `medfm extract` first.")
        try:
            with h5py.File(self.path, "r") as fh:
                self.attrs = {k: _decode(v) for k, v in fh.attrs.items()}
                self.rows = {}
                for split in SPLITS:
                    group = fh[split]
                    n, dim = group["features"].shape
                    if group["labels"].shape[0] != n or group["index"].shape[0] != n:
                        raise StoreError(f"split {split} has mismatched row counts")
                    self.rows[split] = n
                    self.dim = dim
        except StoreError as exc:
            raise StoreError(f"feature store {self.path} is corrupt ({exc}); "
                             f"{_rebuild_hint(self.path)}.") from None
        except (OSError, KeyError, ValueError) as exc:
            raise StoreError(
                f"feature store {self.path} is unreadable or truncated "
                f"({type(exc).__name__}: {exc}); {_rebuild_hint(self.path)}.") from None
        problems = []
        if self.attrs.get("format_version") != FORMAT_VERSION:
            problems.append(
                f"format version {self.attrs.get('format_version')} != {FORMAT_VERSION}")
        if not self.attrs.get("complete"):
            problems.append("not marked complete")
        if self.dim != self.attrs.get("dim"):
            problems.append(f"feature dim {self.dim} != recorded {self.attrs.get('dim')}")
        expected = json.loads(self.attrs.get("rows_json", "{}"))
        if expected != self.rows:
            problems.append(f"rows {self.rows} != recorded {expected}")
        if problems:
            raise StoreError(f"feature store {self.path} is corrupt ({'; '.join(problems)}); "
                             f"{_rebuild_hint(self.path)}.")
        self.key = StoreKey(**json.loads(self.attrs["key_json"]))
        self.fingerprint: str = self.attrs["fingerprint"]

    def features(self, split: str, dtype=np.float32) -> np.ndarray:
        """(N, D) features of `split`, upcast to `dtype`."""
        return self._read(split, "features").astype(dtype, copy=False)

    def labels(self, split: str) -> np.ndarray:
        """(N, L) labels of `split`, as in the npz."""
        return self._read(split, "labels")

    def index(self, split: str) -> np.ndarray:
        """(N,) positions of the rows in the npz split."""
        return self._read(split, "index")

    def _read(self, split: str, name: str) -> np.ndarray:
        if split not in SPLITS:
            raise StoreError(f"split {split!r} is not one of {SPLITS}.")
        try:
            with h5py.File(self.path, "r") as fh:
                return fh[split][name][()]
        except OSError as exc:
            raise StoreError(f"feature store {self.path} could not be read ({exc}); "
                             f"{_rebuild_hint(self.path)}.") from None

    def verify(self) -> None:
        """Recompute the content fingerprint; StoreError if the bytes changed since finalizing."""
        try:
            with h5py.File(self.path, "r") as fh:
                actual = content_fingerprint(fh)
        except OSError as exc:
            raise StoreError(f"feature store {self.path} could not be read ({exc}); "
                             f"{_rebuild_hint(self.path)}.") from None
        if actual != self.fingerprint:
            raise StoreError(f"feature store {self.path} fails its fingerprint check "
                             f"({actual} != {self.fingerprint}); {_rebuild_hint(self.path)}.")

    def summary(self) -> dict:
        """One row for `medfm stores`."""
        return {
            "dataset": self.key.dataset,
            "size": self.key.size,
            "backbone": self.key.backbone,
            "policy": f"{self.key.resize_policy}{self.key.input_size}",
            "dtype": self.key.dtype,
            "dims": self.dim,
            "rows": "/".join(str(self.rows[s]) for s in SPLITS),
            "bytes": self.path.stat().st_size,
            "status": "complete",
            "path": str(self.path),
        }


def content_fingerprint(fh: h5py.File) -> str:
    """sha256 (16 hex) over every split's features, labels and index bytes, in split order."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for name in ("features", "labels", "index"):
            dset = fh[split][name]
            step = max(1, (64 << 20) // max(1, dset.dtype.itemsize * int(np.prod(dset.shape[1:]))))
            for start in range(0, dset.shape[0], step):  # 64 MB at a time
                digest.update(np.ascontiguousarray(dset[start:start + step]).tobytes())
    return digest.hexdigest()[:16]


class StoreWriter:
    """Builds one store as `<path>.partial`, chunk by chunk, resuming a killed build.

    `rows_done(split)` says where to continue; `write(split, start, features)` stores rows
    [start, start + n) and flushes before moving the split's counter; `finalize()` fingerprints
    the file and renames it to `path` atomically.
    """

    def __init__(self, path: Path, key: StoreKey, *, dim: int, labels: dict[str, np.ndarray],
                 attrs: dict, restart: bool = False):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.key = key
        self.dim = dim
        self.resumed = False
        if restart and self.partial.exists():
            self.partial.unlink()
        if self.partial.exists() and self._can_resume(labels):
            self._fh = h5py.File(self.partial, "r+")
            self.resumed = any(self.rows_done(s) for s in SPLITS)
        else:
            self.partial.unlink(missing_ok=True)
            self._create(labels, attrs)
        self.clipped = int(self._fh.attrs.get("float16_clipped", 0))

    def _can_resume(self, labels: dict[str, np.ndarray]) -> bool:
        """True if the partial file opens and was started for this exact key and data."""
        try:
            with h5py.File(self.partial, "r") as fh:
                if fh.attrs.get("key_json") != self.key.to_json():
                    return False
                for split, y in labels.items():
                    if fh[split]["features"].shape != (len(y), self.dim):
                        return False
                    if not np.array_equal(fh[split]["labels"][()], y):
                        return False
                    if int(fh[split].attrs["rows_done"]) > len(y):
                        return False
            return True
        except (OSError, KeyError, ValueError):
            return False  # torn or foreign partial file: start over

    def _create(self, labels: dict[str, np.ndarray], attrs: dict) -> None:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        fh = h5py.File(self.partial, "w")
        for name, value in attrs.items():
            fh.attrs[name] = value
        fh.attrs["format_version"] = FORMAT_VERSION
        fh.attrs["key_json"] = self.key.to_json()
        fh.attrs["complete"] = False
        fh.attrs["dim"] = self.dim
        fh.attrs["rows_json"] = json.dumps({s: len(labels[s]) for s in SPLITS})
        for split in SPLITS:
            n = len(labels[split])
            group = fh.create_group(split)
            # contiguous and allocated up front: chunk writes touch raw data, not file metadata
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            space = h5py.h5s.create_simple((n, self.dim))
            h5py.h5d.create(group.id, b"features", h5py.h5t.py_create(np.dtype(self.key.dtype)),
                            space, dcpl=dcpl)
            group.create_dataset("labels", data=labels[split])
            group.create_dataset("index", data=np.arange(n, dtype=np.int64))
            group.attrs["rows_done"] = 0
        fh.flush()
        self._fh = fh

    def rows_done(self, split: str) -> int:
        return int(self._fh[split].attrs["rows_done"])

    def write(self, split: str, start: int, features: np.ndarray) -> None:
        """Store rows [start, start + len(features)) of `split`; they must follow rows_done."""
        if start != self.rows_done(split):
            raise ValueError(f"chunk starts at {start}, store has {self.rows_done(split)} rows")
        if self.key.dtype == "float16":
            over = np.abs(features) > FLOAT16_MAX
            if over.any():
                self.clipped += int(over.sum())
                features = np.clip(features, -FLOAT16_MAX, FLOAT16_MAX)
                self._fh.attrs["float16_clipped"] = self.clipped
        self._fh[split]["features"][start:start + len(features)] = features
        self._fh.flush()  # rows on disk before the counter says so
        self._fh[split].attrs["rows_done"] = start + len(features)
        self._fh.flush()

    def finalize(self, attrs: dict | None = None) -> Path:
        """Fingerprint, mark complete, close and rename to the final path atomically."""
        for split in SPLITS:
            n = self._fh[split]["features"].shape[0]
            if self.rows_done(split) != n:
                raise ValueError(f"split {split} has {self.rows_done(split)} of {n} rows")
        for name, value in (attrs or {}).items():
            self._fh.attrs[name] = value
        self._fh.attrs["fingerprint"] = content_fingerprint(self._fh)
        self._fh.attrs["complete"] = True
        self._fh.close()
        with open(self.partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without finalizing (the partial file stays, ready to resume)."""
        if self._fh.id.valid:
            self._fh.close()


def list_stores(workdir: str | os.PathLike | None = None) -> list[dict]:
    """Summaries of every store under <workdir>/stores: complete, partial or corrupt."""
    rows = []
    for path in sorted(stores_dir(workdir).glob("*.h5*")):
        if path.name.endswith(".h5"):
            try:
                rows.append(FeatureStore(path).summary())
            except StoreError as exc:
                rows.append({"path": str(path), "status": "corrupt", "error": str(exc),
                             "bytes": path.stat().st_size})
        elif path.name.endswith(".h5" + PARTIAL_SUFFIX):
            row = {"path": str(path), "status": "partial", "bytes": path.stat().st_size}
            try:
                with h5py.File(path, "r") as fh:
                    key = StoreKey(**json.loads(_decode(fh.attrs["key_json"])))
                    done = {s: int(fh[s].attrs["rows_done"]) for s in SPLITS}
                    total = json.loads(_decode(fh.attrs["rows_json"]))
                row.update(dataset=key.dataset, size=key.size, backbone=key.backbone,
                           policy=f"{key.resize_policy}{key.input_size}", dtype=key.dtype,
                           rows=f"{sum(done.values())}/{sum(total.values())} done")
            except (OSError, KeyError, ValueError):
                pass
            rows.append(row)
    return rows


def find_stores(workdir: str | os.PathLike | None = None, *, dataset: str | None = None,
                backbone: str | None = None, size: int | None = None,
                resize_policy: str | None = None) -> list[FeatureStore]:
    """Complete stores matching every given filter (backbone matches arch, arch.tag or the
    name the user extracted with)."""
    found = []
    for path in sorted(stores_dir(workdir).glob("*.h5")):
        # file names start "<dataset>_<size>__": skip other datasets without opening them, so a
        # corrupt store only stops work that asks for it
        if dataset and not path.name.startswith(f"{dataset}_"):
            continue
        if size and f"_{int(size)}__" not in path.name:
            continue
        store = FeatureStore(path)
        key = store.key
        if dataset and key.dataset != dataset:
            continue
        if size and key.size != int(size):
            continue
        if resize_policy and key.resize_policy != resize_policy:
            continue
        if backbone and backbone not in (key.arch, key.backbone, store.attrs.get("backbone_name")):
            continue
        found.append(store)
    return found
