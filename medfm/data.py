"""MedMNIST 2D datasets: the registry of the 12 flags, and loading their npz files offline.

    from medfm.data import load_split, DATASETS
    images, labels = load_split("breastmnist", 28, "train", data_root="../shared/data/medmnist")
    # images: (N, H, W) or (N, H, W, 3) uint8; labels: (N, 1) or (N, 14) uint8

Files are the official `{flag}.npz` (28 px) and `{flag}_{64,128,224}.npz`. A file that is present
is used as it is, with no network; a missing one is downloaded through medmnist unless
$MEDFM_OFFLINE is set. 128/224 px images are memory-mapped (decompressed once into a cache), so
PathMNIST-224 (16 GB) never has to fit in memory.

A dataset enters a run's identity as a `DatasetRef`: flag, size and the MD5 of the file's bytes
(the official MD5 for official files), found once per file and cached (medfm.cache).
"""

from __future__ import annotations

import difflib
import enum
import importlib.util
import os
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfm.cache import file_digest
from medfm.errors import DataFileMissingError, InvalidArgumentError, UnknownDatasetError
from medfm.paths import resolve_data_root

SIZES = (28, 64, 128, 224)  # the sizes MedMNIST+ publishes for every 2D dataset
SPLITS = ("train", "val", "test")  # official splits, in the order stores hold them
MMAP_MIN_SIZE = 128  # sizes at or above this are memory-mapped instead of read into memory
NPY_CACHE_ENV = "MEDFM_NPY_CACHE"  # where decompressed copies of compressed npz members go
STREAM_BYTES = 1 << 26  # decompress 64 MB at a time
OFFLINE_ENV = "MEDFM_OFFLINE"  # set (to anything but "" or "0"): never try to download a file


class Task(str, enum.Enum):
    """MedMNIST task types; `.value` is medmnist's own task string (what its Evaluator takes)."""

    BINARY = "binary-class"
    MULTI_CLASS = "multi-class"
    MULTI_LABEL = "multi-label, binary-class"
    ORDINAL = "ordinal-regression"


@dataclass(frozen=True)
class DatasetInfo:
    """One MedMNIST 2D dataset, as medmnist's INFO describes it."""

    flag: str  # medmnist flag, e.g. "breastmnist"
    python_class: str  # medmnist class name, e.g. "BreastMNIST"
    task: Task  # scoring rule (see metrics.py)
    label_names: tuple[str, ...]  # class names (or the 14 ChestMNIST labels), index order
    n_channels: int  # 1 (grayscale) or 3 (RGB)
    n_samples: dict  # {"train": n, "val": n, "test": n}
    license: str  # "CC BY 4.0" (DermaMNIST: "CC BY-NC 4.0")

    @property
    def n_classes(self) -> int:
        """Number of classes (multi-label: number of labels)."""
        return len(self.label_names)

    @property
    def primary_metric(self) -> str:
        """Model-selection metric: AUC for ChestMNIST (all-negative scores ACC ~94.7), else ACC."""
        return "auc" if self.task is Task.MULTI_LABEL else "acc"

    def filename(self, size: int) -> str:
        """npz file name for `size`: "breastmnist.npz" at 28, "breastmnist_64.npz" otherwise."""
        check_size(size)
        return f"{self.flag}.npz" if size == 28 else f"{self.flag}_{size}.npz"

    def url(self, size: int) -> str:
        """Official download URL (Zenodo) of the file for `size`."""
        return _medmnist_info()[self.flag]["url" + _size_suffix(size)]

    def md5(self, size: int) -> str:
        """Official MD5 of the file for `size`."""
        return _medmnist_info()[self.flag]["MD5" + _size_suffix(size)]


def _size_suffix(size: int) -> str:
    return "" if size == 28 else f"_{size}"


def _medmnist_info() -> dict:
    """medmnist's INFO table, read from its info.py without importing the medmnist package.

    `import medmnist` runs its package __init__, which imports torch, torchvision and PIL (2 s or
    more); info.py itself needs only the standard library. The package is loaded only to
    download a missing file.
    """
    global _INFO
    if _INFO is None:
        loaded = sys.modules.get("medmnist.info")
        if loaded is None:
            spec = importlib.util.find_spec("medmnist")  # locates, does not run, the package
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("medmnist is not installed: pip install medmnist")
            path = Path(next(iter(spec.submodule_search_locations))) / "info.py"
            info_spec = importlib.util.spec_from_file_location("_medfm_medmnist_info", path)
            loaded = importlib.util.module_from_spec(info_spec)
            info_spec.loader.exec_module(loaded)
        _INFO = loaded.INFO
    return _INFO


_INFO: dict | None = None


def _build_registry() -> dict[str, DatasetInfo]:
    registry = {}
    for flag, info in _medmnist_info().items():
        if flag.endswith("3d"):
            continue  # medfm covers the 12 2D datasets
        labels = tuple(info["label"][str(i)] for i in range(len(info["label"])))
        registry[flag] = DatasetInfo(
            flag=flag,
            python_class=info["python_class"],
            task=Task(info["task"]),
            label_names=labels,
            n_channels=int(info["n_channels"]),
            n_samples=dict(info["n_samples"]),
            license=info["license"],
        )
    return registry


DATASETS: dict[str, DatasetInfo] = _build_registry()


def get_dataset(flag: str) -> DatasetInfo:
    """The entry for `flag` (case-insensitive); unknown flags get an error with close matches."""
    key = flag.strip().lower()
    if key in DATASETS:
        return DATASETS[key]
    close = difflib.get_close_matches(key, DATASETS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownDatasetError(
        f"unknown dataset {flag!r}.{hint} Known: {', '.join(DATASETS)}."
    )


def check_size(size: int) -> int:
    """`size` as an int if MedMNIST publishes it, else a clear error."""
    try:
        size = int(size)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"image size {size!r} is not a number; use one of {SIZES}.") from None
    if size not in SIZES:
        raise InvalidArgumentError(f"image size {size} is not published; use one of {SIZES}.")
    return size


def offline() -> bool:
    """Whether $MEDFM_OFFLINE forbids downloads."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def data_file(flag: str, size: int, data_root: str | os.PathLike | None = None) -> Path:
    """Path of the npz for (flag, size), downloading it through medmnist only if it is absent.

    With no network (or $MEDFM_OFFLINE set), the error names the file, its URL and MD5, and
    where to put it.
    """
    info = get_dataset(flag)
    root = resolve_data_root(data_root)
    path = root / info.filename(size)
    if path.exists():
        return path
    if not offline():
        try:
            import medmnist

            root.mkdir(parents=True, exist_ok=True)
            cls = getattr(medmnist, info.python_class)
            cls(split="train", root=str(root), size=size, download=True)
        except Exception:  # noqa: BLE001,S110 - medmnist wraps any failure in a RuntimeError
            pass  # the one-line error below says what to do
    if path.exists():
        return path
    raise DataFileMissingError(
        f"{info.filename(size)} is not in {root} and could not be downloaded: fetch it from "
        f"{info.url(size)} (MD5 {info.md5(size)}) and put it there, or point --data-root / "
        f"$MEDFM_DATA_ROOT at the folder that holds it."
    )


@dataclass(frozen=True)
class DatasetRef:
    """A dataset file as part of a run's identity: equal refs hold the same images."""

    name: str  # MedMNIST flag, e.g. "breastmnist"
    size: int  # source image size: 28, 64, 128 or 224
    digest: str  # MD5 of the npz file's bytes (the official MD5 for an official file)
    path: Path | None = field(default=None, compare=False)  # where it was found

    @property
    def label(self) -> str:
        """"breastmnist@28", as progress bars and messages name it."""
        return f"{self.name}@{self.size}"


def resolve_dataset(flag: str, size: int,
                    data_root: str | os.PathLike | None = None) -> DatasetRef:
    """The identity of (flag, size): its file (downloaded if absent and allowed) and content MD5."""
    info = get_dataset(flag)
    size = check_size(size)
    path = data_file(info.flag, size, data_root)
    return DatasetRef(info.flag, size, file_digest(path, "md5"), path)


def resolve_datasets(flags: Sequence[str] | None, sizes: Sequence[int],
                     data_root: str | os.PathLike | None = None,
                     ) -> tuple[list[DatasetRef], list[str]]:
    """(refs, skipped) for every flag x size, flags outermost.

    `flags=None` means every MedMNIST dataset; then a file that is missing and cannot be
    downloaded is skipped with a one-line reason in `skipped`. A flag the user named is
    required: its missing file raises DataFileMissingError. Nothing at all to work on is an
    error too.
    """
    named = flags is not None
    chosen = [get_dataset(f).flag for f in flags] if named else list(DATASETS)
    refs, skipped = [], []
    for flag in chosen:
        for size in sizes:
            try:
                refs.append(resolve_dataset(flag, size, data_root))
            except DataFileMissingError:
                if named:
                    raise
                skipped.append(f"skipped {flag}@{size}: {get_dataset(flag).filename(size)} is not "
                               f"in {resolve_data_root(data_root)} and could not be downloaded")
    if not refs:
        raise DataFileMissingError(
            f"none of the {len(chosen)} MedMNIST datasets has a file at size(s) "
            f"{', '.join(map(str, sizes))} in {resolve_data_root(data_root)}; point --data-root "
            f"/ $MEDFM_DATA_ROOT at the folder holding the npz files, or name --dataset.")
    return refs, skipped


def _cache_dir(path: Path) -> Path:
    """Where decompressed .npy copies of `path` live: $MEDFM_NPY_CACHE, else ~/.cache/medfm/npy.

    Keyed by file name, size and mtime, so a replaced npz is decompressed afresh.
    """
    stat = path.stat()
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    root = Path(os.environ.get(NPY_CACHE_ENV) or f"{xdg}/medfm/npy").expanduser()
    return root / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def _read_npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from an open .npy stream positioned at its magic string."""
    major, _ = np.lib.format.read_magic(fh)
    if major == 1:
        return np.lib.format.read_array_header_1_0(fh)
    return np.lib.format.read_array_header_2_0(fh)


def _mmap_npz_member(path: Path, key: str) -> np.ndarray:
    """Memory-map array `key` of an npz, decompressing it once into a cached .npy if needed.

    The official files are deflate-compressed zips, which cannot be mapped; the member is streamed
    (64 MB at a time, never whole in memory) into an uncompressed .npy that is then mapped.
    """
    with zipfile.ZipFile(path) as zf:
        member = zf.getinfo(f"{key}.npy")
        if member.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as fh:
                fh.seek(member.header_offset)
                local = fh.read(30)  # zip local file header; name and extra lengths at 26..30
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                fh.seek(member.header_offset + 30 + name_len + extra_len)
                shape, fortran, dtype = _read_npy_header(fh)
                offset = fh.tell()
            order = "F" if fortran else "C"
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
        target = _cache_dir(path) / f"{key}.npy"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            with zf.open(member) as stream:
                shape, fortran, dtype = _read_npy_header(stream)
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape,
                                                fortran_order=fortran)
                flat = out.reshape(-1, order="A").view(np.uint8)
                for start in range(0, flat.size, STREAM_BYTES):
                    view = memoryview(flat[start:start + STREAM_BYTES])
                    got = 0
                    while got < len(view):
                        n = stream.readinto(view[got:])
                        if not n:
                            raise zipfile.BadZipFile(f"{key}.npy ends early")
                        got += n
                out.flush()
                del out, flat
            os.replace(tmp, target)
    return np.load(target, mmap_mode="r")


def load_split(
    flag: str,
    size: int,
    split: str,
    data_root: str | os.PathLike | None = None,
    mmap: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one split: images (N, H, W[, 3]) uint8, labels (N, L) as in the npz.

    `mmap=None` memory-maps sizes >= 128 and reads smaller ones into memory.
    """
    if split not in SPLITS:
        raise InvalidArgumentError(f"split {split!r} is not one of {SPLITS}.")
    size = check_size(size)
    path = data_file(flag, size, data_root)
    use_mmap = size >= MMAP_MIN_SIZE if mmap is None else mmap
    try:
        with np.load(path) as npz:
            labels = npz[f"{split}_labels"]
            images = None if use_mmap else npz[f"{split}_images"]
        if use_mmap:
            images = _mmap_npz_member(path, f"{split}_images")
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise DataFileMissingError(
            f"{path} is not a readable MedMNIST npz ({exc}); delete it and fetch it again "
            f"(MD5 {get_dataset(flag).md5(size)})."
        ) from None
    return images, labels


