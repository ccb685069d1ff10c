"""Imported collections (`medfm import`, medfm.imported): `NAME.npz` / `NAME_{64,128,224}.npz`
in the MedMNIST layout beside a dataset card `NAME.card.json`, which stands in for medmnist's
INFO (task, label names, channels, split counts, the MD5 of each file it wrote).

    SOURCE.find("myus", data_root)          # DatasetInfo from <data root>/myus.card.json

A name that is not a MedMNIST flag is looked up as a card in the data root, then among the cards
this machine has seen ($MEDFM_CACHE/datasets, a copy written on import and whenever a card is
read), so a probe or a grid worker knows the dataset's task without being given the data root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medfm.cache import cache_dir, write_atomic
from medfm.datasources.info import DatasetInfo, Task
from medfm.datasources.npz import NpzSource
from medfm.errors import DataFileMissingError, InvalidDataFileError
from medfm.paths import resolve_data_root

CARD_SUFFIX = ".card.json"  # NAME.card.json beside NAME.npz
CARD_FORMAT = 1
IMPORTED: dict[str, DatasetInfo] = {}  # imported collections this process has read


def read_card(path: Path) -> dict:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidDataFileError(f"dataset card {path} cannot be read ({exc}); import the "
                                   "dataset again with `medfm import ... --force`.") from None
    if card.get("format") != CARD_FORMAT:
        raise InvalidDataFileError(f"dataset card {path} has format {card.get('format')}, not "
                                   f"{CARD_FORMAT}; import the dataset again with --force.")
    return card


def register_card(path: str | os.PathLike) -> DatasetInfo:
    """Read an imported dataset's card, remember it in this process and in this machine's
    cache ($MEDFM_CACHE/datasets), and return its DatasetInfo."""
    card = read_card(Path(path))
    info = DatasetInfo(flag=card["name"], python_class="", task=Task(card["task"]),
                       label_names=tuple(card["label_names"]),
                       n_channels=int(card["n_channels"]), n_samples=dict(card["n_samples"]),
                       license=card.get("license", ""), card=card, source=SOURCE)
    IMPORTED[info.flag] = info
    copy = cache_dir("datasets") / f"{info.flag}{CARD_SUFFIX}"
    text = json.dumps(card, indent=1)
    try:
        if not copy.exists() or copy.read_text(encoding="utf-8") != text:
            write_atomic(copy, text)
    except OSError:
        pass  # the copy only saves passing --data-root later
    return info


class ImportedSource(NpzSource):
    """Collections imported with `medfm import`, found by their cards."""

    name = "imported"
    title = "imported"  # how `medfm datasets` names the source

    def find(self, key: str, data_root) -> DatasetInfo | None:
        if data_root is None and key in IMPORTED:
            return IMPORTED[key]
        if key and all(c.isalnum() or c in "_-" for c in key):
            for folder in (resolve_data_root(data_root), cache_dir("datasets")):
                card = folder / f"{key}{CARD_SUFFIX}"
                if card.is_file():
                    return register_card(card)
        return IMPORTED.get(key)

    def known(self) -> list[str]:
        return list(IMPORTED)

    def listed(self, data_root) -> list[str]:
        root = resolve_data_root(data_root)
        return sorted(p.name[:-len(CARD_SUFFIX)] for p in root.glob(f"*{CARD_SUFFIX}")) if (
            root.is_dir()) else []

    def md5(self, info: DatasetInfo, size: int) -> str:
        return info.card.get("sizes", {}).get(str(size), {}).get("md5", "")

    def url(self, info: DatasetInfo, size: int) -> str:
        return ""

    def fetch_hint(self, info: DatasetInfo, size: int) -> str:
        return (f"import it again with `medfm import {info.flag} SOURCE --sizes {size} "
                f"--force` (source was {info.card.get('source', {}).get('path')})")

    def refetch_hint(self, info: DatasetInfo, size: int) -> str:
        return f"delete it and {info.fetch_hint(size)}"

    def file(self, info: DatasetInfo, size: int, root: Path) -> Path:
        path = root / info.filename(size)
        if path.exists():
            return path
        raise DataFileMissingError(f"{info.filename(size)} is not in {root}: "
                                   f"{info.fetch_hint(size)}.")

    def digest_warning(self, info: DatasetInfo, size: int, path: Path, digest: str,
                       rows: dict[str, int]) -> str | None:
        recorded = info.md5(size)
        if digest == recorded:
            return None
        return (f"{path} changed since it was imported (MD5 {digest}, card says "
                f"{recorded or 'not imported at this size'}); its results are kept apart: "
                f"{info.fetch_hint(size)}")


SOURCE = ImportedSource()
