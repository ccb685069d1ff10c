"""Datasets stored as MedMNIST npz files (`{split}_images` uint8 (N, S, S[, 3]),
`{split}_labels` (N, L)): reading a split (memory-mapped at 128 px and above, decompressed once
into a cache) and checking a file against its `DatasetInfo` once per content. `NpzSource` gives
a dataset source (medfm.datasources) its `check` and `arrays` for files in this layout.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from medfm.cache import cache_dir, read_json, write_atomic
from medfm.datasources.info import SPLITS, DatasetInfo, Task
from medfm.errors import InvalidDataFileError, MedfmError

MMAP_MIN_SIZE = 128  # sizes at or above this are memory-mapped instead of read into memory
NPY_CACHE_ENV = "MEDFM_NPY_CACHE"  # where decompressed copies of compressed npz members go
STREAM_BYTES = 1 << 26  # decompress 64 MB at a time


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


NPZ_CHECK_VERSION = 1  # part of every cached verdict's name: bump when _check_split changes
WHY_CHARS = 160  # of a reader's own error message quoted in a broken file's one line


def _refetch_hint(info: DatasetInfo, size: int) -> str:
    return info.source.refetch_hint(info, size)


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


def check_npz(path: Path, info: DatasetInfo, size: int, digest: str) -> dict[str, int]:
    """Rows per split of `path` after checking it holds (`info`, `size`) as its source describes
    it: every split's arrays, images uint8 of the right side and channels, one label row per
    image with the dataset's label count and class range. InvalidDataFileError (one line, what
    to do) if not.

    Reads the arrays' headers and labels, never the images. A file that passed is remembered
    under its MD5 `digest` in $MEDFM_CACHE/npz-checks, so a file is checked once per content.
    """
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


def read_split(path: Path, info: DatasetInfo, size: int, split: str,
               mmap: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one split of an npz, checked against `info`."""
    with _reading(path, info, size):
        with np.load(path) as npz:
            labels = npz[f"{split}_labels"]
            images = None if mmap else npz[f"{split}_images"]
        if mmap:
            images = _mmap_npz_member(path, f"{split}_images")
    _check_split(path, info, size, split, images.shape, images.dtype, labels)
    return images, labels


class NpzSource:
    """What a source of files in the MedMNIST npz layout shares (DatasetSource.check, arrays)."""

    def check(self, info: DatasetInfo, size: int, path: Path, digest: str) -> dict[str, int]:
        return check_npz(path, info, size, digest)

    def arrays(self, info: DatasetInfo, size: int, split: str, path: Path,
               mmap: bool) -> tuple[np.ndarray, np.ndarray]:
        return read_split(path, info, size, split, mmap)
