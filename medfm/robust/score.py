"""Probes scored on corrupted test splits (MedMNIST-C, medfm.robust.corrupt), without refitting.

    medfm extract ... --corruptions medmnist-c     # embeds the corrupted test splits once
    medfm probe ...                                 # new runs and recorded ones get scored

A probe fitted now is scored on every corrupted split its store has, right after the fit (the
model is in memory). Its state (logistic regression: standardization and weights, a few KB) is
kept in `<workdir>/probes/<key digest>.npz`, so corrupted splits added later score the recorded
run without refitting. A run recorded before its state was kept is refitted once (the same
deterministic fit, same subset), its state kept, its row left as it is. kNN keeps no state: its
"fit" is remembering the training subset, redone at no cost.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfm.data import Task
from medfm.errors import StoreError
from medfm.metrics import evaluate
from medfm.paths import resolve_workdir
from medfm.resolve.defaults import N_BOOTSTRAP  # as the clean test metrics

PROBES_DIRNAME = "probes"  # <workdir>/probes/<digest>.npz: fitted probe states
RUN_ARRAY = "_run"  # the array of a state file that names its run (key digest)


@dataclass
class Evaluation:
    """One run scored on one corrupted test split."""

    corruption: str
    severity: int
    metrics: object  # medfm.metrics.Metrics
    scores: np.ndarray  # (N_test, C) float32


@dataclass
class ScoredRun:
    """A probe job's result: unpacks as (row, test scores, test labels) like any job's row; also
    carries its corrupted evaluations and the fitted state to keep."""

    row: object
    scores: np.ndarray
    y_true: np.ndarray
    evaluations: list = field(default_factory=list)
    state: dict | None = None

    def __iter__(self):
        return iter((self.row, self.scores, self.y_true))


def state_path(workdir: str | os.PathLike | None, digest: str) -> Path:
    return resolve_workdir(workdir) / PROBES_DIRNAME / f"{digest}.npz"


def save_state(workdir: str | os.PathLike | None, digest: str, state: dict) -> None:
    """Write a fitted probe's arrays atomically."""
    path = state_path(workdir, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **state, **{RUN_ARRAY: np.array(digest)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_state(workdir: str | os.PathLike | None, digest: str) -> dict | None:
    """The kept arrays of a run, or None (never kept, or unreadable: then the run is refitted).
    A state that names another run (copied or renamed onto this run's name) is refused."""
    path = state_path(workdir, digest)
    try:
        with np.load(path, allow_pickle=False) as npz:
            state = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError, EOFError, zlib.error):
        return None
    held = state.pop(RUN_ARRAY, None)  # states kept before it was recorded have none
    if held is not None and str(held) != digest:
        raise StoreError(f"probe state {path} is named for run {digest} but holds run "
                         f"{held}: it was copied or renamed onto this name; delete it and "
                         "rerun (the run is refitted).")
    return state


def score_pairs(model, store, pairs, task: Task, y_test: np.ndarray,
                device: str | None = None) -> list[Evaluation]:
    """`model` (predict_proba) on each (corruption, severity) of `pairs` (a dict pair -> sibling
    store, medfm.robust.stores.available_pairs); test metrics on `device` (None: numpy)."""
    out = []
    for (corruption, severity), sibling in sorted(pairs.items()):
        scores = model.predict_proba(sibling.features(corruption, severity)).astype(np.float32)
        metrics = evaluate(y_test, scores, task, n_bootstrap=N_BOOTSTRAP, seed=0, device=device)
        out.append(Evaluation(corruption, severity, metrics, scores))
    return out


def record(registry, workdir, scored) -> None:
    """Keep a job's fitted state and add its corrupted evaluations to the registry."""
    if getattr(scored, "state", None) is not None:
        save_state(workdir, scored.row.key.digest(), scored.state)
    for ev in getattr(scored, "evaluations", ()) or ():
        registry.add_evaluation(scored.row.key, ev.corruption, ev.severity, ev.metrics,
                                ev.scores)
