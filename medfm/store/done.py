"""Is it done? One answer, over the store index and the results registry, for every stage, the
grid planner and grid workers alike.

    from medfm.store.done import finished_keys, finished_store, recorded_run
    finished_store(request.path(workdir))      # the finished store a request names, or None
    finished_keys(workdir, keys)                # digests of those keys with a row: one query
    recorded_run(workdir, key, needs=best_pt)   # (row, scores, labels) of a recorded run

A store is done when the file its request names (medfm.resolve.store) is there and opens (a
corrupt one is left to its extract job, which reports it by name). A probe or fine-tune run is
done when its key has a row in the registry. A fine-tune run a worker resumes is done when its
row is recorded and its tested weights are kept (`needs`); a registry a worker cannot read (SQLite
over a network file system) counts as "not recorded": the run then resumes from its
checkpoint, which costs a test pass at most, never a wrong row. Nothing here loads a model, an
image or a feature.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from medfm.errors import MedfmError, StoreError
from medfm.paths import resolve_workdir
from medfm.resolve.keys import ResultKey
from medfm.store.features import FeatureStore
from medfm.store.registry import REGISTRY_FILENAME, Registry, ResultRow


def finished_store(path: Path, *, report_corrupt: bool = False) -> FeatureStore | None:
    """The finished store at `path`, or None (absent, or corrupt: its extract job says why;
    with `report_corrupt`, the extract job itself, a corrupt store is the StoreError naming it)."""
    if not path.exists():
        return None
    try:
        return FeatureStore(path)
    except StoreError:
        if report_corrupt:
            raise
        return None


def finished_keys(workdir: str | os.PathLike | None, keys: Iterable[ResultKey | str], *,
                  registry: Registry | None = None) -> set[str]:
    """Digests of those `keys` recorded in the work directory's registry (one query). With no
    `registry` given, a work directory without one has none done and nothing is created."""
    keys = list(keys)
    if registry is not None:
        return registry.done_keys(keys)
    path = resolve_workdir(workdir, create=False) / REGISTRY_FILENAME
    if not path.is_file():
        return set()
    opened = Registry(path, read_only=True)
    try:
        return opened.done_keys(keys)
    finally:
        opened.close()


def recorded_run(workdir: str | os.PathLike | None, key: ResultKey, *,
                 needs: Path | None = None) -> tuple[ResultRow, np.ndarray, np.ndarray] | None:
    """(row, test scores, test labels) of a run recorded in the registry, else None; with
    `needs`, only once that file exists too (a fine-tune's best.pt, written after its row)."""
    path = resolve_workdir(workdir, create=False) / REGISTRY_FILENAME
    if not path.exists() or (needs is not None and not needs.exists()):
        return None
    try:
        reg = Registry(path, read_only=True)  # a worker reads; the driver writes
        try:
            row = reg.get(key)
            if row is None:
                return None
            y_true, y_score = reg.scores(key)
            return row, y_score, y_true
        finally:
            reg.close()
    except (sqlite3.Error, MedfmError, OSError):
        return None
