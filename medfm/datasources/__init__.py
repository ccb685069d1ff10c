"""Dataset sources: where datasets come from, one module per source, each implementing
`DatasetSource` (base.py): describe a dataset (info: task, labels, channels, split counts), find
or fetch its file at a size, the digest that file should have, and its splits' arrays.

    medmnist.py   the 12 MedMNIST 2D datasets (medmnist's INFO, official npz files, download)
    cards.py      imported collections (`medfm import`): npz files beside a dataset card
    npz.py        reading and checking files in the MedMNIST npz layout (both sources use it)
    info.py       DatasetInfo, Task, SIZES, SPLITS (what every source describes)

    find_dataset("breastmnist", data_root)      # DatasetInfo (info.source is its source)

medfm.data asks these sources and nothing else (names, files, digests, arrays); the digest in a
run's identity is the MD5 of the file's bytes, whatever the source.

**To add a dataset source**, add one module to this folder whose source object implements
DatasetSource (files in the MedMNIST npz layout: subclass npz.NpzSource), give the DatasetInfos
it makes `source=` that object, add it to SOURCES below (or call `register_source` from a
plug-in or a test), and write its tests. Sources are asked in order; the first that knows a name
describes it, so MedMNIST flags can never be shadowed.
"""

from __future__ import annotations

import os

from medfm.datasources import cards, medmnist
from medfm.datasources.base import DatasetSource
from medfm.datasources.info import SIZES, SPLITS, DatasetInfo, Task, check_size

SOURCES: list[DatasetSource] = [medmnist.SOURCE, cards.SOURCE]  # asked in this order


def register_source(source: DatasetSource) -> DatasetSource:
    """Add a source, asked after the others (replacing one of the same name)."""
    if not isinstance(source, DatasetSource):
        raise TypeError(f"{source!r} does not implement medfm.datasources.DatasetSource")
    SOURCES[:] = [s for s in SOURCES if s.name != source.name] + [source]
    return source


def find_dataset(key: str, data_root: str | os.PathLike | None = None) -> DatasetInfo | None:
    """The dataset named `key` (lower case) by the first source that knows it, or None."""
    for source in SOURCES:
        info = source.find(key, data_root)
        if info is not None:
            return info
    return None


def known_names() -> list[str]:
    """Every name this process knows of, source by source."""
    return [name for source in SOURCES for name in source.known()]


def listed(data_root: str | os.PathLike | None = None) -> list[str]:
    """Every dataset the sources have for `data_root` (`medfm datasets`)."""
    return [name for source in SOURCES for name in source.listed(data_root)]


__all__ = ["SIZES", "SOURCES", "SPLITS", "DatasetInfo", "DatasetSource", "Task", "check_size",
           "find_dataset", "known_names", "listed", "register_source"]
