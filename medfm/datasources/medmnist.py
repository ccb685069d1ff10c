"""The 12 MedMNIST 2D datasets, from the `medmnist` package's INFO (flags, tasks, labels, MD5s)
and its official files `{flag}.npz` (28 px) and `{flag}_{64,128,224}.npz`.

    DATASETS["breastmnist"].task           # Task.BINARY
    SOURCE.file(info, 64, root)             # root / "breastmnist_64.npz", downloaded if absent

A present file is used as it is, with no network; a missing one is downloaded through medmnist
unless $MEDFM_OFFLINE is set. A file with the official split sizes but another MD5 gets one
warning (its results are kept apart by their digest).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from medfm.datasources.info import DatasetInfo, Task
from medfm.datasources.npz import NpzSource
from medfm.errors import DataFileMissingError

OFFLINE_ENV = "MEDFM_OFFLINE"  # set (to anything but "" or "0"): never try to download a file


def offline() -> bool:
    """Whether $MEDFM_OFFLINE forbids downloads."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def _size_suffix(size: int) -> str:
    return "" if size == 28 else f"_{size}"


_INFO: dict | None = None


def medmnist_info() -> dict:
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


class MedMNISTSource(NpzSource):
    """The official MedMNIST 2D files."""

    name = "medmnist"
    title = "MedMNIST"  # how `medfm datasets` names the source

    def find(self, key: str, data_root) -> DatasetInfo | None:
        return DATASETS.get(key)

    def known(self) -> list[str]:
        return list(DATASETS)

    def listed(self, data_root) -> list[str]:
        return list(DATASETS)

    def md5(self, info: DatasetInfo, size: int) -> str:
        return medmnist_info()[info.flag]["MD5" + _size_suffix(size)]

    def url(self, info: DatasetInfo, size: int) -> str:
        return medmnist_info()[info.flag]["url" + _size_suffix(size)]

    def fetch_hint(self, info: DatasetInfo, size: int) -> str:
        return (f"fetch the official {info.filename(size)} from {info.url(size)} "
                f"(MD5 {info.md5(size)})")

    def refetch_hint(self, info: DatasetInfo, size: int) -> str:
        return f"delete it and {info.fetch_hint(size)}, or write it in the official layout"

    def file(self, info: DatasetInfo, size: int, root: Path) -> Path:
        path = root / info.filename(size)
        if path.exists():
            return path
        if not offline():
            try:
                # medmnist imports torch and torchvision: loaded only to download a file
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

    def digest_warning(self, info: DatasetInfo, size: int, path: Path, digest: str,
                       rows: dict[str, int]) -> str | None:
        official = info.md5(size)
        if digest == official or rows != info.n_samples:
            return None
        return (f"{path} has the official split sizes but MD5 {digest}, not the official "
                f"{official} (a damaged or re-saved download?); its results are kept apart from "
                f"the official file's: to compare with published numbers, fetch it again from "
                f"{info.url(size)}")


SOURCE = MedMNISTSource()


def _build_registry() -> dict[str, DatasetInfo]:
    registry = {}
    for flag, info in medmnist_info().items():
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
            source=SOURCE,
        )
    return registry


DATASETS: dict[str, DatasetInfo] = _build_registry()
