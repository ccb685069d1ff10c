"""Datasets by name: the 12 MedMNIST 2D flags and imported collections, their files, their
identity in a run (`DatasetRef`) and their splits' arrays, all asked of the dataset sources
(medfm.datasources: one module per source; add a source there, not here).

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
in for medmnist's INFO (medfm.datasources.cards says where cards are looked up).
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfm.cache import file_digest
from medfm.datasources import find_dataset, known_names
from medfm.datasources.cards import CARD_SUFFIX, IMPORTED, register_card
from medfm.datasources.info import SIZES, SPLITS, DatasetInfo, Task, check_size
from medfm.datasources.medmnist import DATASETS, OFFLINE_ENV, offline
from medfm.datasources.npz import MMAP_MIN_SIZE, NPY_CACHE_ENV
from medfm.errors import (DataFileMissingError, InvalidArgumentError, MedfmWarning,
                          UnknownDatasetError)
from medfm.paths import resolve_data_root

__all__ = ["CARD_SUFFIX", "DATASETS", "IMPORTED", "MMAP_MIN_SIZE", "NPY_CACHE_ENV", "OFFLINE_ENV",
           "SIZES", "SPLITS", "DatasetInfo", "DatasetRef", "Task", "check_npz", "check_size",
           "data_file", "get_dataset", "load_split", "offline", "register_card",
           "resolve_dataset", "resolve_datasets"]


def get_dataset(flag: str, data_root: str | os.PathLike | None = None) -> DatasetInfo:
    """The entry for `flag` (case-insensitive): a MedMNIST dataset, else an imported one (its
    card in `data_root` or the default data root, else the copy this machine last saw).
    Unknown names get an error with close matches."""
    key = flag.strip().lower()
    info = find_dataset(key, data_root)
    if info is not None:
        return info
    close = difflib.get_close_matches(key, known_names(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownDatasetError(
        f"unknown dataset {flag!r}.{hint} Known: {', '.join(DATASETS)}; imported datasets are "
        f"found by their card (NAME{CARD_SUFFIX}) in --data-root: see `medfm datasets`."
    )


def data_file(flag: str, size: int, data_root: str | os.PathLike | None = None) -> Path:
    """Path of the npz for (flag, size), fetched by its source only if it is absent (MedMNIST:
    downloaded through medmnist unless $MEDFM_OFFLINE is set).

    With no network (or $MEDFM_OFFLINE set), the error names the file, its URL and MD5, and
    where to put it.
    """
    info = get_dataset(flag, data_root)
    return info.source.file(info, check_size(size), resolve_data_root(data_root))


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

    The file is checked against its source's description first (`check_npz`), so a broken file
    is one clear error before any model loads; a file whose MD5 is not the one its source
    expects (a damaged or re-saved official file, an imported file changed since) gets one
    MedfmWarning.
    """
    info = get_dataset(flag, data_root)
    size = check_size(size)
    path = data_file(info.flag, size, data_root)
    digest = file_digest(path, "md5")
    rows = info.source.check(info, size, path, digest)
    warning = info.source.digest_warning(info, size, path, digest, rows)
    if warning:
        warnings.warn(MedfmWarning(warning), stacklevel=2)
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
    return info.source.arrays(info, size, split, path, use_mmap)


def check_npz(path: str | os.PathLike, flag: str, size: int, *,
              digest: str | None = None) -> dict[str, int]:
    """Rows per split of `path` after checking it holds (`flag`, `size`) as its source describes
    it (medfm.datasources.npz.check_npz); InvalidDataFileError (one line, what to do) if not.
    Checked once per content (`digest`, the file's MD5, found if not given)."""
    path = Path(path)
    info, size = get_dataset(flag, path.parent), check_size(size)
    return info.source.check(info, size, path, digest or file_digest(path, "md5"))
