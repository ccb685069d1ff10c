"""What a dataset is, whatever its source: `DatasetInfo` (task, labels, channels, split counts),
the task types, the published sizes and the official splits. The bottom of medfm.datasources:
no other medfm module but errors.

    info.task is Task.BINARY, info.n_classes, info.filename(64)   # "breastmnist_64.npz"
    info.md5(28), info.fetch_hint(28)                               # asked of info.source
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass, field
from typing import Any

from medfm.errors import InvalidArgumentError

SIZES = (28, 64, 128, 224)  # the sizes MedMNIST+ publishes for every 2D dataset
SPLITS = ("train", "val", "test")  # official splits, in the order stores hold them


class Task(str, enum.Enum):
    """MedMNIST task types; `.value` is medmnist's own task string (what its Evaluator takes)."""

    BINARY = "binary-class"
    MULTI_CLASS = "multi-class"
    MULTI_LABEL = "multi-label, binary-class"
    ORDINAL = "ordinal-regression"


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


@dataclass(frozen=True)
class DatasetInfo:
    """One 2D dataset, as its source describes it (medmnist's INFO, an imported card)."""

    flag: str  # medmnist flag or imported name, e.g. "breastmnist"
    python_class: str  # medmnist class name, e.g. "BreastMNIST" ("" when imported)
    task: Task  # scoring rule (see metrics.py)
    label_names: tuple[str, ...]  # class names (or the 14 ChestMNIST labels), index order
    n_channels: int  # 1 (grayscale) or 3 (RGB)
    n_samples: dict  # {"train": n, "val": n, "test": n}
    license: str  # "CC BY 4.0" (DermaMNIST: "CC BY-NC 4.0")
    card: dict | None = field(default=None, compare=False, repr=False)  # imported: its card
    source: Any = field(default=None, compare=False, repr=False)  # the DatasetSource that
    # describes it (medfm.datasources): where its files come from, their expected digests

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
        """Where the file for `size` is published ("" where it is not)."""
        return self.source.url(self, size)

    def md5(self, size: int) -> str:
        """The MD5 the file for `size` should have (official, or what the import recorded; ""
        when unknown)."""
        return self.source.md5(self, size)

    def fetch_hint(self, size: int) -> str:
        """How to get the file for `size` again."""
        return self.source.fetch_hint(self, size)
