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

Imported collections (`medfm import`, medfm.imported) are datasets too: `NAME.npz` /
`NAME_{64,128,224}.npz` in the same layout beside a dataset card `NAME.card.json`, which stands
in for medmnist's INFO. A name that is not a MedMNIST flag is looked up as a card in the data
root, then among the cards this machine has seen ($MEDFM_CACHE/datasets, a copy written on
import and whenever a card is read), so a probe or a grid worker knows the dataset's task
without being given the data root.
"""

from __future__ import annotations

import difflib
import enum
import importlib.util
import json
import numbers
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfm.cache import cache_dir, file_digest, read_json, write_atomic
from medfm.errors import (
    DataFileMissingError,
    InvalidArgumentError,
    InvalidDataFileError,
    MedfmError,
    MedfmWarning,
    UnknownDatasetError,
)
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
    card: dict | None = field(default=None, compare=False, repr=False)  # imported: its card

    @property
    def imported(self) -> bool:
        """An imported collection (medfm.imported), not a MedMNIST dataset."""
        return self.card is not None

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
        """Official download URL (Zenodo) of the file for `size` ("" for an imported one)."""
        if self.imported:
            return ""
        return _medmnist_info()[self.flag]["url" + _size_suffix(size)]

    def md5(self, size: int) -> str:
        """Official MD5 of the file for `size` (imported: the MD5 its card recorded, "" if it
        was not imported at that size)."""
        if self.imported:
            return self.card.get("sizes", {}).get(str(size), {}).get("md5", "")
        return _medmnist_info()[self.flag]["MD5" + _size_suffix(size)]

    def fetch_hint(self, size: int) -> str:
        """How to get the file for `size` again."""
        if self.imported:
            return (f"import it again with `medfm import {self.flag} SOURCE --sizes {size} "
                    f"--force` (source was {self.card.get('source', {}).get('path')})")
        return (f"fetch the official {self.filename(size)} from {self.url(size)} "
                f"(MD5 {self.md5(size)})")


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


IMPORTED: dict[str, DatasetInfo] = {}  # imported collections this process has read
CARD_SUFFIX = ".card.json"  # an imported dataset's card: <data root>/<name>.card.json


def register_card(path: str | os.PathLike) -> DatasetInfo:
    """Read an imported dataset's card, remember it in this process and in this machine's
    cache ($MEDFM_CACHE/datasets), and return its DatasetInfo."""
    from medfm.imported import read_card

    card = read_card(Path(path))
    info = DatasetInfo(flag=card["name"], python_class="", task=Task(card["task"]),
                       label_names=tuple(card["label_names"]),
                       n_channels=int(card["n_channels"]), n_samples=dict(card["n_samples"]),
                       license=card.get("license", ""), card=card)
    IMPORTED[info.flag] = info
    copy = cache_dir("datasets") / f"{info.flag}{CARD_SUFFIX}"
    text = json.dumps(card, indent=1)
    try:
        if not copy.exists() or copy.read_text(encoding="utf-8") != text:
            write_atomic(copy, text)
    except OSError:
        pass  # the copy only saves passing --data-root later
    return info


def get_dataset(flag: str, data_root: str | os.PathLike | None = None) -> DatasetInfo:
    """The entry for `flag` (case-insensitive): a MedMNIST dataset, else an imported one (its
    card in `data_root` or the default data root, else the copy this machine last saw).
    Unknown names get an error with close matches."""
    key = flag.strip().lower()
    if key in DATASETS:
        return DATASETS[key]
    if data_root is None and key in IMPORTED:
        return IMPORTED[key]
    if key and all(c.isalnum() or c in "_-" for c in key):
        for folder in (resolve_data_root(data_root), cache_dir("datasets")):
            card = folder / f"{key}{CARD_SUFFIX}"
            if card.is_file():
                return register_card(card)
        if key in IMPORTED:
            return IMPORTED[key]
    close = difflib.get_close_matches(key, [*DATASETS, *IMPORTED], n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownDatasetError(
        f"unknown dataset {flag!r}.{hint} Known: {', '.join(DATASETS)}; imported datasets are "
        f"found by their card (NAME{CARD_SUFFIX}) in --data-root: see `medfm datasets`."
    )


def check_size(size: int) -> int:
    """`size` as an int if MedMNIST publishes it, else a clear error (True and 28.5 are not
    sizes; "28" is)."""
    value = size
    if isinstance(size, str):
        value = int(size.strip()) if size.strip().isdigit() else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
        raise InvalidArgumentError(
            f"image size {size!r} is not a whole number; use one of {SIZES}.")
    if int(value) not in SIZES:
        raise InvalidArgumentError(f"image size {size!r} is not published; use one of {SIZES}.")
    return int(value)


def offline() -> bool:
    """Whether $MEDFM_OFFLINE forbids downloads."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def data_file(flag: str, size: int, data_root: str | os.PathLike | None = None) -> Path:
    """Path of the npz for (flag, size), downloading it through medmnist only if it is absent.

    With no network (or $MEDFM_OFFLINE set), the error names the file, its URL and MD5, and
    where to put it.
    """
    info = get_dataset(flag, data_root)
    root = resolve_data_root(data_root)
    path = root / info.filename(size)
    if path.exists():
        return path
    if info.imported:
        raise DataFileMissingError(f"{info.filename(size)} is not in {root}: "
                                   f"{info.fetch_hint(size)}.")
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
    """The identity of (flag, size): its file (downloaded if absent and allowed) and content MD5.

    The file is checked against INFO first (`check_npz`), so a broken file is one clear error
    before any model loads; a file with the official split sizes whose MD5 is not the official
    one (damaged or re-saved) gets one MedfmWarning.
    """
    info = get_dataset(flag, data_root)
    size = check_size(size)
    path = data_file(info.flag, size, data_root)
    digest = file_digest(path, "md5")
    rows = check_npz(path, info.flag, size, digest=digest)
    official = info.md5(size)
    if info.imported:
        if digest != official:
            warnings.warn(MedfmWarning(
                f"{path} changed since it was imported (MD5 {digest}, card says "
                f"{official or 'not imported at this size'}); its results are kept apart: "
                f"{info.fetch_hint(size)}"), stacklevel=2)
    elif digest != official and rows == info.n_samples:
        warnings.warn(MedfmWarning(
            f"{path} has the official split sizes but MD5 {digest}, not the official {official} "
            f"(a damaged or re-saved download?); its results are kept apart from the official "
            f"file's: to compare with published numbers, fetch it again from {info.url(size)}"),
            stacklevel=2)
    return DatasetRef(info.flag, size, digest, path)


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
    chosen = [get_dataset(f, data_root).flag for f in flags] if named else list(DATASETS)
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
    info = get_dataset(flag, data_root)
    size = check_size(size)
    path = data_file(info.flag, size, data_root)
    use_mmap = size >= MMAP_MIN_SIZE if mmap is None else mmap
    with _reading(path, info, size):
        with np.load(path) as npz:
            labels = npz[f"{split}_labels"]
            images = None if use_mmap else npz[f"{split}_images"]
        if use_mmap:
            images = _mmap_npz_member(path, f"{split}_images")
    _check_split(path, info, size, split, images.shape, images.dtype, labels)
    return images, labels


# --- checking a file against INFO ---------------------------------------------------------------

NPZ_CHECK_VERSION = 1  # part of every cached verdict's name: bump when _check_split changes
WHY_CHARS = 160  # of a reader's own error message quoted in a broken file's one line


def _refetch_hint(info: DatasetInfo, size: int) -> str:
    if info.imported:
        return f"delete it and {info.fetch_hint(size)}"
    return f"delete it and {info.fetch_hint(size)}, or write it in the official layout"


@contextmanager
def _reading(path: Path, info: DatasetInfo, size: int) -> Iterator[None]:
    """Turn any way numpy, zipfile, zlib or the .npy header parser fail on a broken npz
    (BadZipFile, zlib.error, tokenize's TokenError, NotImplementedError, a header asking for
    more memory than there is...) into one InvalidDataFileError: a flipped byte anywhere in a
    file is a broken file, never a traceback (tests/test_bad_inputs.py fuzzes this)."""
    try:
        yield
    except MedfmError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes a reader raise
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # a file-system failure (permission, disk), not a broken file
        why = " ".join(str(exc).strip("'\"").split())[:WHY_CHARS] or type(exc).__name__
        raise InvalidDataFileError(f"{path} is not a readable MedMNIST npz ({why}); "
                                   f"{_refetch_hint(info, size)}.") from None


def _check_split(path: Path, info: DatasetInfo, size: int, split: str, image_shape: tuple,
                 image_dtype: np.dtype, labels: np.ndarray) -> None:
    """One split as INFO describes it: images uint8 (N, S, S) or (N, S, S, 3), N >= 1; labels
    integer (N, 1) class ids in [0, classes) or (N, L) 0/1 multi-labels."""
    def bad(what: str) -> InvalidDataFileError:
        return InvalidDataFileError(f"{path}: {what}; {_refetch_hint(info, size)}.")

    side = (size, size) if info.n_channels == 1 else (size, size, 3)
    wanted = f"uint8 (N, {', '.join(map(str, side))})"
    if np.dtype(image_dtype) != np.uint8 or tuple(image_shape[1:]) != side:
        raise bad(f"{split}_images is {np.dtype(image_dtype)} {tuple(image_shape)}, not {wanted} "
                  f"as {info.flag}@{size} ({info.n_channels} channel(s)) has")
    n = image_shape[0]
    if n == 0:
        raise bad(f"{split}_images holds no image")
    multi_label = info.task is Task.MULTI_LABEL
    _check_label_shape(path, info, size, split, image_shape[:1], labels.shape)
    if labels.dtype.kind not in "iu":
        raise bad(f"{split}_labels are {labels.dtype}, not integers")
    if multi_label:
        if not np.isin(labels, (0, 1)).all():
            raise bad(f"{split}_labels hold values other than 0 and 1 ({info.task.value})")
    elif labels.min() < 0 or labels.max() >= info.n_classes:
        raise bad(f"{split}_labels range over {labels.min()}..{labels.max()}, not class ids "
                  f"0..{info.n_classes - 1} of {info.flag}")


def _check_label_shape(path: Path, info: DatasetInfo, size: int, split: str,
                       n_images: tuple, label_shape: tuple) -> None:
    """One row of INFO's label count per image."""
    columns = info.n_classes if info.task is Task.MULTI_LABEL else 1
    n = n_images[0] if n_images else 0
    if tuple(label_shape) != (n, columns):
        raise InvalidDataFileError(
            f"{path}: {split}_labels is shaped {tuple(label_shape)}, not ({n}, {columns}): one "
            f"row of {columns} label(s) per image of {split}_images; "
            f"{_refetch_hint(info, size)}.")


def _npy_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """array name -> (shape, dtype) of every .npy member of an npz, from headers only."""
    headers = {}
    with zipfile.ZipFile(path) as zf:
        for member in zf.infolist():
            if member.filename.endswith(".npy"):
                with zf.open(member) as stream:
                    shape, _, dtype = _read_npy_header(stream)
                headers[member.filename[:-len(".npy")]] = (shape, dtype)
    return headers


def check_npz(path: str | os.PathLike, flag: str, size: int, *,
              digest: str | None = None) -> dict[str, int]:
    """Rows per split of `path` after checking it holds (`flag`, `size`) as INFO describes it:
    every split's arrays, images uint8 of the right side and channels, one label row per image
    with INFO's label count and class range. InvalidDataFileError (one line, what to do) if not.

    Reads the arrays' headers and labels, never the images. A file that passed is remembered
    under its MD5 (`digest`, found if not given) in $MEDFM_CACHE/npz-checks, so a file is
    checked once per content.
    """
    path = Path(path)
    info, size = get_dataset(flag, path.parent), check_size(size)
    digest = digest or file_digest(path, "md5")
    entry = cache_dir("npz-checks") / f"{info.flag}_{size}_{digest}_v{NPZ_CHECK_VERSION}.json"
    cached = read_json(entry)
    if isinstance(cached, dict) and isinstance(cached.get("rows"), dict):
        return cached["rows"]
    with _reading(path, info, size):
        headers = _npy_headers(path)
        missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")
                   if f"{s}_{kind}" not in headers]
        if missing:
            raise InvalidDataFileError(f"{path} lacks {', '.join(missing)}; "
                                       f"{_refetch_hint(info, size)}.")
        for s in SPLITS:  # from the headers, before a damaged one can size an allocation
            _check_label_shape(path, info, size, s, headers[f"{s}_images"][0][:1],
                               headers[f"{s}_labels"][0])
        with np.load(path) as npz:
            labels = {s: npz[f"{s}_labels"] for s in SPLITS}
    for s in SPLITS:
        shape, dtype = headers[f"{s}_images"]
        _check_split(path, info, size, s, shape, dtype, labels[s])
    rows = {s: int(headers[f"{s}_images"][0][0]) for s in SPLITS}
    try:
        write_atomic(entry, json.dumps({"rows": rows}))
    except OSError:
        pass  # a cache that cannot be written only costs the check again next time
    return rows


