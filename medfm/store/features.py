"""HDF5 feature stores: one file per extraction request (medfm.resolve.store.StoreRequest: dataset
file, backbone and weights, preprocessing, feature kind, dtype), holding every split's
frozen-backbone features.

    store = FeatureStore("medfm-work/stores/breastmnist_28__...h5")   # opens and verifies
    X = store.features("train")          # (N, D) float32 (stored float16 by default)
    y = store.labels("train")            # (N, L) as in the npz
    store.request                        # the request it answers, as plain data

Layout: groups `train`, `val`, `test`, each with `features` (N, D), `labels` (N, L) and `index`
(N,) (row -> position in the npz split); file attributes carry the request (`request_json`), the
full provenance and a content fingerprint. The file is named by its request
(medfm.resolve.keys.store_filename, ending in the request's digest), so finding the store for a
request is one lookup. A store is built as `<name>.h5.partial`: rows land chunk by chunk, each
chunk flushed before the split's `rows_done` counter moves past it, so a killed extraction
resumes from the last complete chunk. When every split is full the fingerprint is written and
the file is renamed to `<name>.h5` in one atomic step: a `.h5` file is always complete.

Integrity. A store's bytes are checked against its fingerprint before any of them is used: the
first read of a store's arrays reads every split once, hashing as it goes, and a mismatch is a
StoreError naming the store and the command that rebuilds it. A store that passed is recorded
as verified in `$MEDFM_CACHE/verified`, keyed by its path, size, modification time and
fingerprint, so later reads skip the full hash; any write to the file (a flipped byte
included) changes its modification time and the next read checks it again. Bit rot that keeps
size and mtime is caught too: a store is finalized with a CRC-32 per CHECK_ROWS rows of each
array (attribute `crc32`, the per-chunk checksum HDF5's Fletcher-32 would give, but kept off the
resumable contiguous layout), and every read checks the blocks it reads (0.06 s per 230 MB).
Stores written before checksums have none and are checked as before; `medfm stores --verify`
rechecks every store in full. Non-finite features are refused on every read. One writer per
store: StoreWriter is used under `store_lock` (an advisory lock the OS releases when its holder
dies), so a second extraction of the same request waits, then finds the store built.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from medfm.backbones.names import canonical_backbone_id
from medfm.cache import cache_dir, read_json, write_atomic
from medfm.data import SPLITS
from medfm.errors import DiskFullError, InvalidArgumentError, StoreError, is_disk_full
from medfm.locks import LockHeld, exclusive_lock
from medfm.paths import resolve_workdir
from medfm.resolve.keys import (PARTIAL_SUFFIX, STORE_DIGEST_CHARS, STORES_DIRNAME, canonical_json,
                                store_digest, store_filename)
from medfm.store.migrate import upgrade_stores, v1_attrs

FORMAT_VERSION = 2  # 2: identified by its request (request_json); 1 (StoreKey) is upgraded
FLOAT16_MAX = 65504.0  # features beyond this are clipped (and counted) when stored as float16
LOCKS_DIRNAME = ".locks"  # <workdir>/stores/.locks/<store name>.lock: one writer per store
ARRAYS = ("features", "labels", "index")  # datasets of each split, in fingerprint order
CHECK_ROWS = 1024  # rows per checksummed block of a finished store's arrays
CHECKSUM_ATTR = "crc32"  # attribute of each array: (ceil(N / CHECK_ROWS),) uint32 CRC-32s


_FLOAT16_TABLE: np.ndarray | None = None  # every float16 bit pattern as float32 (256 KB)


def upcast(values: np.ndarray, dtype=np.float32) -> np.ndarray:
    """`values.astype(dtype)`, bit for bit, faster for float16 -> float32 (a store's default).

    numpy converts half floats one at a time (1.2 s for a 90k x 1280 split on a 2-core CPU).
    When torch is already imported (the torch solver, extraction) its vectorized conversion does
    it in 0.17 s; otherwise a lookup in the table of all 65,536 float16 values as numpy converts
    them, in 0.65 s. Neither imports anything.
    """
    if values.dtype != np.float16 or np.dtype(dtype) != np.float32:
        return values.astype(dtype, copy=False)
    values = np.require(values, requirements=["C", "W"])  # torch shares writable memory only
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        return torch.from_numpy(values).float().numpy()
    global _FLOAT16_TABLE
    if _FLOAT16_TABLE is None:
        _FLOAT16_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    return _FLOAT16_TABLE[values.view(np.uint16)]


def stores_dir(workdir: str | os.PathLike | None = None) -> Path:
    """<workdir>/stores, created, with stores written by older medfm versions upgraded once."""
    path = resolve_workdir(workdir) / STORES_DIRNAME
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StoreError(f"{path} is not a folder; move that file away (the work directory "
                         "keeps its feature stores there).") from None
    upgrade_stores(path)
    return path


def _rebuild_hint(path: Path, request: dict | None = None) -> str:
    """How to rebuild the store at `path`: the exact extract command when its request is known;
    for a file too damaged to hold one, the command its name gives (medfm.resolve
    .store_filename) and the options the name keeps only in its digest."""
    if request:
        return f"rebuild it with `{_extract_command(path, request)} --force`"
    named = parse_store_filename(path.name)
    policy = (named or {}).get("policy", "").rstrip("0123456789")
    if not named or not policy or not path.name.split("__")[3].startswith("prelogits-"):
        return (f"delete {path} and run `medfm extract` again (or rerun it with --force) "
                f"to rebuild it")
    flags = (f"--dataset {named['dataset']} --size {named['size']} --backbone "
             f"{named['backbone']} --resize-policy {policy} --input-size "
             f"{named['policy'][len(policy):]} --dtype {path.name.split('__')[3][10:]}")
    return (f"rebuild it with `medfm extract {flags} --workdir {path.parent.parent} --force`, "
            "adding the --weights, --normalize and --precision it was built with (its name "
            "keeps them only in its digest)")


def _extract_command(path: Path, request: dict) -> str:
    """The `medfm extract` command that builds the store of `request` at `path`."""
    weights = request.get("weights", "pretrained")
    flags = [f"--dataset {request['dataset']}", f"--size {request['size']}",
             f"--backbone {request['backbone']}",
             f"--resize-policy {request['resize_policy']}",
             f"--input-size {request['input_size']}", f"--normalize {request['normalize']}",
             f"--dtype {request['dtype']}", f"--precision {request.get('precision', 'float32')}"]
    if weights == "random":
        flags.append("--weights random")
    elif weights.startswith("file:"):
        flags.append(f"--weights <the weights file with sha256 {weights[5:]}...>")
    workdir = path.parent.parent
    return f"medfm extract {' '.join(flags)} --workdir {workdir}"


def _verified_entry(path: Path, fingerprint: str) -> tuple[Path, str] | None:
    """(cache file, identity) of the record saying the store at `path` matched `fingerprint`
    as it is now (path, size, mtime); None if the file cannot be stat'ed."""
    try:
        resolved = path.resolve()
        stat = resolved.stat()
    except OSError:
        return None
    identity = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{fingerprint}"
    return cache_dir("verified") / hashlib.sha1(identity.encode()).hexdigest(), identity


def is_verified(path: Path, fingerprint: str) -> bool:
    """Whether the store at `path` was checked against `fingerprint` since it last changed."""
    entry = _verified_entry(path, fingerprint)
    if entry is None:
        return False
    record = read_json(entry[0])
    return isinstance(record, dict) and record.get("identity") == entry[1]


def mark_verified(path: Path, fingerprint: str) -> None:
    """Record that the store at `path`, as it is now, matches `fingerprint`."""
    entry = _verified_entry(path, fingerprint)
    if entry is not None:
        write_atomic(entry[0], json.dumps({"identity": entry[1]}))


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


OPEN_ATTRS = ("format_version", "complete", "dim", "rows_json", "request_json", "fingerprint",
              "weights_digest")  # what opening a store reads; the rest loads on first use


class FeatureStore:
    """A complete, verified feature store, opened read-only (one header read: planning a grid
    opens every finished store)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(
                f"feature store {self.path} does not exist; run `medfm extract` first.")
        if self.path.name.endswith(PARTIAL_SUFFIX):
            raise StoreError(_partial_is_not_a_store(self.path))
        self._all_attrs: dict | None = None
        try:
            with h5py.File(self.path, "r") as fh:
                version = _decode(fh.attrs.get("format_version"))
                names = list(fh.attrs) if version == 1 else OPEN_ATTRS
                self._attrs = {k: _decode(fh.attrs.get(k)) for k in names}
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
        attrs = self._attrs
        if attrs.get("format_version") == 1:  # not upgraded yet (opened by its path)

            try:
                self._attrs = self._all_attrs = attrs = v1_attrs(attrs)
            except (KeyError, ValueError, TypeError) as exc:  # a pre-release layout-1 writer
                raise StoreError(
                    f"feature store {self.path} is in an early layout medfm cannot read "
                    f"({type(exc).__name__}: {exc}); {_rebuild_hint(self.path)}.") from None
        problems = []
        if attrs.get("format_version") != FORMAT_VERSION:
            problems.append(f"format version {attrs.get('format_version')} != {FORMAT_VERSION}")
        if not attrs.get("complete"):
            problems.append("not marked complete")
        if self.dim != attrs.get("dim"):
            problems.append(f"feature dim {self.dim} != recorded {attrs.get('dim')}")
        expected = json.loads(attrs.get("rows_json") or "{}")
        if expected != self.rows:
            problems.append(f"rows {self.rows} != recorded {expected}")
        if problems:
            raise StoreError(f"feature store {self.path} is corrupt ({'; '.join(problems)}); "
                             f"{_rebuild_hint(self.path)}.")
        self.request: dict = json.loads(attrs["request_json"])
        if version == FORMAT_VERSION:  # as written (a layout-1 store's name carries no digest)
            self._check_named_request()
        self.fingerprint: str = attrs["fingerprint"]
        self.weights_digest: str = attrs.get("weights_digest") or ""  # the tensors embedded with
        self._checked = False  # bytes compared with the fingerprint (or recorded as verified)
        self._pending: dict = {}  # (split, name) -> array read while verifying, not yet returned

    def _check_named_request(self) -> None:
        """A store found by its file name holds the request that name carries: a store copied
        or renamed onto another request's name is refused, naming both requests."""
        named = digest_in_name(self.path.name)
        held = store_digest(self.request)
        if named is not None and named != held:
            r = self.request
            raise StoreError(
                f"feature store {self.path} is named for request {named} but holds request "
                f"{held} ({r.get('dataset')}@{r.get('size')} {r.get('backbone')}, weights "
                f"{r.get('weights')}): it was copied or renamed onto this name; move it back to "
                f"{store_filename(self.request)} or delete it, then run `medfm extract` for the "
                "request you want.")

    def _damaged(self, why: str) -> StoreError:
        return StoreError(f"feature store {self.path} is damaged ({why}); "
                          f"{_rebuild_hint(self.path, self.request)}.")

    @property
    def attrs(self) -> dict:
        """Every attribute of the file: the request, provenance, fingerprint (read on first use)."""
        if self._all_attrs is None:
            try:
                with h5py.File(self.path, "r") as fh:
                    self._all_attrs = {k: _decode(v) for k, v in fh.attrs.items()}
            except OSError as exc:
                raise StoreError(f"feature store {self.path} could not be read ({exc}); "
                                 f"{_rebuild_hint(self.path)}.") from None
        return self._all_attrs

    def features(self, split: str, dtype=np.float32) -> np.ndarray:
        """(N, D) features of `split`, upcast to `dtype`."""
        return upcast(self._read(split, "features"), dtype)

    def labels(self, split: str) -> np.ndarray:
        """(N, L) labels of `split`, as in the npz."""
        return self._read(split, "labels")

    def index(self, split: str) -> np.ndarray:
        """(N,) positions of the rows in the npz split."""
        return self._read(split, "index")

    def _read(self, split: str, name: str) -> np.ndarray:
        if split not in SPLITS:
            raise StoreError(f"split {split!r} is not one of {SPLITS}.")
        if not self._checked:
            if is_verified(self.path, self.fingerprint):
                self._checked = True
            else:  # the first read of an unverified store reads (and checks) all of it
                self._pending = self._read_all()
                self._checked = True
        value = self._pending.pop((split, name), None)
        if value is None:
            try:
                with h5py.File(self.path, "r") as fh:
                    value = fh[split][name][()]
                    self._check_blocks(fh[split][name], value, f"{split}/{name}")
            except (OSError, KeyError) as exc:
                raise self._damaged(f"{split}/{name} could not be read: {exc}") from None
        if name == "features" and not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).any(axis=1).sum())
            raise self._damaged(f"{bad} row(s) of {split}/features are NaN or infinite")
        return value

    def _read_all(self) -> dict:
        """Every split's arrays, read once while hashing them; StoreError unless the hash is
        the store's fingerprint (then the store is recorded as verified)."""
        digest = hashlib.sha256()
        arrays = {}
        try:
            with h5py.File(self.path, "r") as fh:
                for split in SPLITS:
                    for name in ARRAYS:
                        value = fh[split][name][()]
                        self._check_blocks(fh[split][name], value, f"{split}/{name}")
                        digest.update(np.ascontiguousarray(value).tobytes())
                        arrays[(split, name)] = value
        except (OSError, KeyError) as exc:
            raise self._damaged(f"unreadable: {exc}") from None
        actual = digest.hexdigest()[:16]
        if actual != self.fingerprint:
            raise self._damaged(f"its contents hash to {actual}, not its fingerprint "
                                f"{self.fingerprint}: bytes changed after it was finished")
        mark_verified(self.path, self.fingerprint)
        return arrays

    def _check_blocks(self, dset: h5py.Dataset, value: np.ndarray, what: str,
                      start: int = 0) -> None:
        """StoreError unless every CHECK_ROWS block of `value` (rows of `dset` from `start`)
        has the CRC-32 stored with it (stores written before checksums have none)."""
        bad = failed_block(dset, value, start)
        if bad is not None:
            raise self._damaged(f"{what} rows {bad}-{min(bad + CHECK_ROWS, dset.shape[0]) - 1} "
                                "fail their checksum: bytes changed after it was finished")

    def verify(self, *, force: bool = False) -> None:
        """Check the bytes against the fingerprint and every block against its checksum
        (skipped when already recorded as verified, unless `force`); StoreError naming the
        store and how to rebuild it if they differ."""
        if force or not is_verified(self.path, self.fingerprint):
            try:
                with h5py.File(self.path, "r") as fh:
                    actual = content_fingerprint(fh, check=self._check_blocks)
            except (OSError, KeyError) as exc:
                raise self._damaged(f"unreadable: {exc}") from None
            if actual != self.fingerprint:
                raise self._damaged(f"its contents hash to {actual}, not its fingerprint "
                                    f"{self.fingerprint}: bytes changed after it was finished")
            mark_verified(self.path, self.fingerprint)
        self._checked = True

    def summary(self) -> dict:
        """One row for `medfm stores`."""
        return {
            **_request_columns(self.request),
            "dims": self.dim,
            "rows": "/".join(str(self.rows[s]) for s in SPLITS),
            "bytes": self.path.stat().st_size,
            "status": "complete",
            "path": str(self.path),
        }


def _partial_is_not_a_store(path: Path) -> str:
    """What to do with a `.partial` file named where a finished store is wanted: resume it."""
    try:
        with h5py.File(path, "r") as fh:
            request = json.loads(_decode(fh.attrs["request_json"]))
        how = f"`{_extract_command(path.with_name(path.name[:-len(PARTIAL_SUFFIX)]), request)}`"
    except (OSError, KeyError, ValueError):
        how = "the `medfm extract` that started it"
    return (f"{path} is an extraction in progress or interrupted, not a finished store: it "
            f"resumes from its last complete chunk when you rerun {how} (nothing is lost); "
            f"then use {path.name[:-len(PARTIAL_SUFFIX)]}.")


def _request_columns(request: dict) -> dict:
    """What `medfm stores` shows of a store's request."""
    return {"dataset": request["dataset"], "size": request["size"],
            "backbone": request["backbone"], "weights": request["weights"],
            "policy": f"{request['resize_policy']}{request['input_size']}",
            "dtype": request["dtype"]}


def content_fingerprint(fh: h5py.File, splits: tuple[str, ...] = SPLITS, *,
                        check: Callable[[h5py.Dataset, np.ndarray, str, int], None] | None = None
                        ) -> str:
    """sha256 (16 hex) over every split's features, labels and index bytes, in split order;
    `check(dset, rows, what, start)` is shown every slice read (FeatureStore._check_blocks)."""
    digest = hashlib.sha256()
    for split in splits:
        for name in ARRAYS:
            dset = fh[split][name]
            for start in range(0, dset.shape[0], _slice_rows(dset)):  # 64 MB at a time
                rows = np.ascontiguousarray(dset[start:start + _slice_rows(dset)])
                if check is not None:
                    check(dset, rows, f"{split}/{name}", start)
                digest.update(rows.tobytes())
    return digest.hexdigest()[:16]


def _slice_rows(dset: h5py.Dataset) -> int:
    """Rows of `dset` in about 64 MB, a whole number of CHECK_ROWS blocks."""
    row_bytes = max(1, dset.dtype.itemsize * int(np.prod(dset.shape[1:])))
    return max(1, (64 << 20) // row_bytes // CHECK_ROWS) * CHECK_ROWS


def block_checksums(value: np.ndarray) -> np.ndarray:
    """(ceil(N / CHECK_ROWS),) uint32: the CRC-32 of each block of CHECK_ROWS rows of `value`
    (its bytes in C order; zlib reads the array's memory, no copy)."""
    value = np.ascontiguousarray(value)
    return np.array([zlib.crc32(value[i:i + CHECK_ROWS]) for i in range(0, len(value),
                                                                         CHECK_ROWS)],
                    dtype=np.uint32)


def failed_block(dset: h5py.Dataset, rows: np.ndarray, start: int = 0) -> int | None:
    """The first row of a block of `rows` (rows of `dset` from `start`, a multiple of
    CHECK_ROWS) whose CRC-32 is not the one stored with `dset`; None if all match, or if `dset`
    was written before checksums (it has none)."""
    stored = dset.attrs.get(CHECKSUM_ATTR)
    if stored is None:
        return None
    first = start // CHECK_ROWS
    actual = block_checksums(rows)
    expected = np.asarray(stored).reshape(-1)[first:first + len(actual)]
    if len(expected) != len(actual):  # a checksum list that does not fit the array: damaged
        return start
    wrong = np.flatnonzero(actual != expected)
    return None if not len(wrong) else start + int(wrong[0]) * CHECK_ROWS


def write_checksums(fh: h5py.File, splits: tuple[str, ...]) -> None:
    """Store the block CRC-32s of every array of `splits` (a finished file, before its rename),
    so a read that touches a changed block fails whatever the file's mtime says."""
    for split in splits:
        for name in ARRAYS:
            dset = fh[split][name]
            step = _slice_rows(dset)
            dset.attrs[CHECKSUM_ATTR] = np.concatenate(
                [block_checksums(dset[i:i + step]) for i in range(0, dset.shape[0], step)]
                or [np.zeros(0, np.uint32)])


class StoreWriter:
    """Builds one store as `<path>.partial`, chunk by chunk, resuming a killed build.

    `rows_done(split)` says where to continue; `write(split, start, features)` stores rows
    [start, start + n) and flushes before moving the split's counter; `finalize()` fingerprints
    the file and renames it to `path` atomically. The splits are the keys of `labels`, in order
    (train, val, test for a store; one per corruption and severity for a corrupted sibling).
    """

    def __init__(self, path: Path, request: dict, *, dim: int, labels: dict[str, np.ndarray],
                 attrs: dict, restart: bool = False):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.request_json = canonical_json(request)
        self.dtype = request["dtype"]
        self.dim = dim
        self.splits = tuple(labels)  # SPLITS for a store; corruption sets for a sibling
        self.resumed = False
        if restart and self.partial.exists():
            self.partial.unlink()
        if self.partial.exists() and self._can_resume(labels):
            self._fh = h5py.File(self.partial, "r+")
            self.resumed = any(self.rows_done(s) for s in self.splits)
        else:
            self.partial.unlink(missing_ok=True)
            self._create(labels, attrs)
        self.clipped = int(self._fh.attrs.get("float16_clipped", 0))

    def _can_resume(self, labels: dict[str, np.ndarray]) -> bool:
        """True if the partial file opens and was started for this exact request and data."""
        try:
            with h5py.File(self.partial, "r") as fh:
                if _decode(fh.attrs.get("request_json")) != self.request_json:
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
        rows = sum(len(y) for y in labels.values())
        needed = (rows * self.dim * np.dtype(self.dtype).itemsize
                  + sum(y.nbytes for y in labels.values()) + rows * 8 + SPACE_MARGIN)
        _check_space(self.partial, needed)
        fh = h5py.File(self.partial, "w")
        for name, value in attrs.items():
            fh.attrs[name] = value
        fh.attrs["format_version"] = FORMAT_VERSION
        fh.attrs["request_json"] = self.request_json
        fh.attrs["request_digest"] = store_digest(json.loads(self.request_json))
        fh.attrs["complete"] = False
        fh.attrs["dim"] = self.dim
        fh.attrs["rows_json"] = json.dumps({s: len(labels[s]) for s in self.splits})
        for split in self.splits:
            n = len(labels[split])
            group = fh.create_group(split)
            # contiguous and allocated up front: chunk writes touch raw data, not file metadata
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            space = h5py.h5s.create_simple((n, self.dim))
            h5py.h5d.create(group.id, b"features", h5py.h5t.py_create(np.dtype(self.dtype)),
                            space, dcpl=dcpl)
            group.create_dataset("labels", data=labels[split])
            group.create_dataset("index", data=np.arange(n, dtype=np.int64))
            group.attrs["rows_done"] = 0
        fh.flush()
        self._fh = fh
        self._reserve()

    def _reserve(self) -> None:
        """Allocate the partial file's blocks now (it is created at full size, but sparse), so
        a disk that fills up later cannot fail a chunk write halfway through the extraction."""
        try:
            with open(self.partial, "r+b") as raw:
                os.posix_fallocate(raw.fileno(), 0, os.fstat(raw.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return  # a filesystem that cannot preallocate: writes allocate as they go
            if not is_disk_full(exc):
                raise
            self._fh.close()
            self.partial.unlink(missing_ok=True)
            raise DiskFullError(
                f"not enough space in {self.partial.parent} to reserve {self.path.name} at its "
                "full size; free space there (or write to another --workdir) and rerun.") from None

    def rows_done(self, split: str) -> int:
        return int(self._fh[split].attrs["rows_done"])

    def write(self, split: str, start: int, features: np.ndarray) -> None:
        """Store rows [start, start + len(features)) of `split`; they must follow rows_done."""
        if start != self.rows_done(split):
            raise ValueError(f"chunk starts at {start}, store has {self.rows_done(split)} rows")
        finite = np.isfinite(features).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite) + start
            raise StoreError(
                f"the backbone produced NaN or infinite features for {len(bad)} image(s) of "
                f"{split} (rows {bad[0]}-{bad[-1]}); nothing was stored for them. Check the "
                f"weights and the preprocessing of {self.path.name}; the partial store keeps "
                f"the {start} rows before them.")
        if self.dtype == "float16":
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
        for split in self.splits:
            n = self._fh[split]["features"].shape[0]
            if self.rows_done(split) != n:
                raise ValueError(f"split {split} has {self.rows_done(split)} of {n} rows")
        for name, value in (attrs or {}).items():
            self._fh.attrs[name] = value
        self._fh.attrs["fingerprint"] = content_fingerprint(self._fh, self.splits)
        write_checksums(self._fh, self.splits)
        self._fh.attrs["complete"] = True
        fingerprint = self._fh.attrs["fingerprint"]
        self._fh.close()
        with open(self.partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.partial, self.path)
        mark_verified(self.path, _decode(fingerprint))  # hashed from the bytes just written
        return self.path

    def close(self) -> None:
        """Close without finalizing (the partial file stays, ready to resume)."""
        if self._fh.id.valid:
            self._fh.close()


SPACE_MARGIN = 1 << 20  # bytes of HDF5 metadata and attributes beyond a store's arrays
def _check_space(path: Path, needed: int) -> None:
    """DiskFullError before anything is written if a file of `needed` bytes cannot fit at
    `path`: the filesystem's free space for this user, and this process's file-size limit."""
    usage = os.statvfs(path.parent)
    free = room = usage.f_bavail * usage.f_frsize
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            room = min(free, limit)
    except (ImportError, OSError, ValueError):
        pass
    if needed > room:
        what = "free space" if room == free else "the file-size limit (ulimit -f)"
        raise DiskFullError(
            f"{path.name} needs {needed / 1e6:.1f} MB but {what} in {path.parent} leaves "
            f"{room / 1e6:.1f} MB; free space there (or write to another --workdir) and rerun.")


@contextmanager
def disk_full_is_one_line(path: Path) -> Iterator[None]:
    """Turn a failed write of the store at `path` for want of space into one DiskFullError
    line; the partial file stays, and a rerun resumes it from its last complete chunk (a torn
    partial is detected then and started afresh)."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFullError(
            f"disk full while writing {path.name} in {path.parent} "
            f"({str(exc).splitlines()[0][:120]}); free space there and rerun: the store "
            "resumes from its last complete chunk.") from None


@contextmanager
def store_lock(path: Path, *, wait: bool = True, label: str = "") -> Iterator[None]:
    """Hold the advisory write lock of the store at `path` (`stores/.locks/<name>.lock`).

    A second holder waits (after one line saying for whom) or, with wait=False, gets a
    StoreError. The lock is flock(2): the OS releases it when its holder exits, killed or not,
    so a stale lock never blocks a rerun. The lock file keeps the holder's pid for the message.
    """
    try:
        with exclusive_lock(path.parent / LOCKS_DIRNAME / (path.name + ".lock"),
                            label=label or path.name, wait=wait):
            yield
    except LockHeld as held:  # raised on entry only (wait=False)
        raise StoreError(f"another process (pid {held.holder}) is writing {path.name}; wait "
                         "for it to finish, then rerun.") from None


def list_stores(workdir: str | os.PathLike | None = None, *, verify: bool = True,
                recheck: bool = False) -> list[dict]:
    """Summaries of every store under <workdir>/stores: complete, partial or corrupt.

    With `verify`, a finished store not recorded as verified since it last changed is read
    once and checked against its fingerprint and block checksums (a damaged one shows as
    corrupt); with `recheck`, every store is, whatever is recorded; without either, an
    unchecked store shows as "unverified". A work directory that does not exist is an
    InvalidArgumentError, and listing creates nothing (a mistyped --workdir)."""
    where = resolve_workdir(workdir, create=False)
    if not where.is_dir():
        raise InvalidArgumentError(f"work directory {where} does not exist; check --workdir (or "
                                   "$MEDFM_WORKDIR): `medfm extract` creates it")
    if not (where / STORES_DIRNAME).exists():
        return []  # nothing extracted yet (and listing creates nothing)
    rows = []
    for path in sorted(stores_dir(workdir).glob("*.h5*")):
        if path.name.endswith(".h5"):
            try:
                store = FeatureStore(path)
                summary = store.summary()
                if verify or recheck:
                    store.verify(force=recheck)
                elif not is_verified(path, store.fingerprint):
                    summary["status"] = "unverified"
                rows.append(summary)
            except StoreError as exc:
                rows.append({"path": str(path), "status": "corrupt", "error": str(exc),
                             "bytes": path.stat().st_size})
        elif path.name.endswith(".h5" + PARTIAL_SUFFIX):
            row = {"path": str(path), "status": "partial", "bytes": path.stat().st_size}
            try:
                with h5py.File(path, "r") as fh:
                    request = json.loads(_decode(fh.attrs["request_json"]))
                    done = {s: int(fh[s].attrs["rows_done"]) for s in SPLITS}
                    total = json.loads(_decode(fh.attrs["rows_json"]))
                row.update(_request_columns(request),
                           rows=f"{sum(done.values())}/{sum(total.values())} done")
            except (OSError, KeyError, ValueError):
                pass
            rows.append(row)
    return rows


def digest_in_name(name: str) -> str | None:
    """The request digest a store (or corrupted sibling) file name ends in (`...__<16 hex>.h5`,
    `...__c<16 hex>.h5`), or None for a name without one (a user's own name, layout 1)."""
    stem = name.removesuffix(PARTIAL_SUFFIX).removesuffix(".h5")
    digest = stem.rpartition("__")[2].removeprefix("c")
    return digest if len(digest) == STORE_DIGEST_CHARS and all(
        c in "0123456789abcdef" for c in digest) else None


def parse_store_filename(name: str) -> dict | None:
    """dataset, size, backbone, policy of a store file name (medfm.resolve.keys.store_filename), or
    None for a name of another shape."""
    parts = name.split("__")
    if len(parts) != 5 or not parts[4].startswith(tuple("0123456789abcdef")):
        return None
    dataset, _, size = parts[0].rpartition("_")
    if not size.isdigit():
        return None
    return {"dataset": dataset, "size": int(size), "backbone": parts[1], "policy": parts[2]}


def find_stores(workdir: str | os.PathLike | None = None, *, dataset: str | None = None,
                backbone: str | None = None, size: int | None = None,
                resize_policy: str | None = None) -> list[FeatureStore]:
    """Complete stores matching every given filter; `backbone` in any spelling (alias, bare
    architecture, arch.tag). Names are matched first, so only the matching files are opened and
    a corrupt store stops only work that asks for it."""
    wanted_backbone = canonical_backbone_id(backbone) if backbone else None
    found = []
    if not (resolve_workdir(workdir, create=False) / STORES_DIRNAME).exists():
        return found  # nothing extracted there (and looking creates nothing)
    for path in sorted(stores_dir(workdir).glob("*.h5")):
        named = parse_store_filename(path.name)
        if named is None:
            continue
        if dataset and named["dataset"] != dataset:
            continue
        if size and named["size"] != int(size):
            continue
        if wanted_backbone and named["backbone"] != wanted_backbone:
            continue
        if resize_policy and named["policy"].rstrip("0123456789") != resize_policy:
            continue  # "pad224" is pad, "pad-norm224" is not
        found.append(FeatureStore(path))
    return found
