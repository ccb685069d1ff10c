"""The protocol every dataset source implements (medfm.datasources has one module each).

A source describes its datasets (`find`: a `DatasetInfo` with task, labels, channels and split
counts), finds or fetches a dataset's file at a size (`file`), says which digest that file
should have and what to do when it is missing or damaged, and reads its splits' arrays
(`arrays`, checked by `check` once per file content). The digest that enters every run's
identity is the MD5 of the file's bytes (medfm.data.resolve_dataset), the same for every
source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from medfm.datasources.info import DatasetInfo


@runtime_checkable
class DatasetSource(Protocol):
    """Where datasets come from: MedMNIST's files, imported collections, ..."""

    name: str  # "medmnist", "imported"
    title: str  # how `medfm datasets` names it: "MedMNIST", "imported"

    def find(self, key: str, data_root: str | os.PathLike | None) -> DatasetInfo | None:
        """The dataset named `key` (lower case), or None when this source has no such name."""

    def known(self) -> list[str]:
        """Names this process knows of (close matches in an unknown-dataset error)."""

    def listed(self, data_root: str | os.PathLike | None) -> list[str]:
        """The datasets this source has for `data_root` (`medfm datasets`)."""

    def md5(self, info: DatasetInfo, size: int) -> str:
        """The MD5 the file for `size` should have ("" when unknown)."""

    def url(self, info: DatasetInfo, size: int) -> str:
        """Where the file for `size` is published ("" where it is not)."""

    def fetch_hint(self, info: DatasetInfo, size: int) -> str:
        """How to get the file for `size` again (a clause of a one-line error)."""

    def refetch_hint(self, info: DatasetInfo, size: int) -> str:
        """What to do with a damaged file for `size` (a clause of a one-line error)."""

    def file(self, info: DatasetInfo, size: int, root: Path) -> Path:
        """The file for `size` in `root`, fetched if absent and allowed; DataFileMissingError
        saying what to do otherwise."""

    def digest_warning(self, info: DatasetInfo, size: int, path: Path, digest: str,
                       rows: dict[str, int]) -> str | None:
        """Why a file whose content MD5 is `digest` is not what this source says (a warning:
        its results are kept apart by the digest), or None."""

    def check(self, info: DatasetInfo, size: int, path: Path, digest: str) -> dict[str, int]:
        """Rows per split after checking the file holds the dataset as `info` describes it."""

    def arrays(self, info: DatasetInfo, size: int, split: str, path: Path,
               mmap: bool) -> tuple[np.ndarray, np.ndarray]:
        """(images (N, S, S[, 3]) uint8, labels (N, L)) of one split, memory-mapped if `mmap`."""
