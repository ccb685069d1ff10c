"""How the registry stores arrays (.npy BLOBs) and reads a stored run's task back: shared by the
registry and its migrations (medfm.store.migrate), which import it and not each other.
"""

from __future__ import annotations

import io

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from medfm.data import Task

def stored_task(dataset: str, y_true: np.ndarray, y_score: np.ndarray) -> Task:
    """The task a stored run's scores answer: its dataset's, or, for an imported dataset whose
    card this machine no longer has, what the arrays say (several label columns: multi-label;
    at most two score columns: binary; else multi-class, which ordinal scores the same)."""
    # not at import: opening a registry (medfm results) never loads the dataset catalogue
    from medfm.data import Task, get_dataset
    from medfm.errors import UnknownDatasetError

    try:
        return get_dataset(dataset).task
    except UnknownDatasetError:
        if y_true.ndim == 2 and y_true.shape[1] > 1:
            return Task.MULTI_LABEL
        return Task.BINARY if y_score.ndim == 1 or y_score.shape[1] <= 2 else Task.MULTI_CLASS


def to_npy(array: np.ndarray) -> bytes:
    """`array` serialized as a .npy file (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def from_npy(blob: bytes) -> np.ndarray:
    """Inverse of `to_npy`."""
    return np.load(io.BytesIO(blob), allow_pickle=False)


