"""Few-shot episodes: N-way K-shot training subsets drawn N times, files that carry them between
labs, and their summary (mean over episodes with a 95% interval).

    medfm probe --method simpleshot --shots 1,5,10 --episodes 20          # 20 episodes per shot
    medfm episodes export --dataset breastmnist --shots 5 --episodes 20 --out ep.json
    medfm probe --method logreg --episode-file ep.json                    # the same episodes

    from medfm.episodes import export_episodes, load_episodes, episode_summary

Drawing. Episode e of seed s (medfm.sampling, `SubsetSpec(shots=k, seed=s, episode=e)`) is k
images of every class (or of `ways` classes drawn first) of the training split, from one
numpy generator seeded with (s, EPISODE_STREAM, e): the same seed gives the same episodes to
every method, backbone and process, and each run records its episode's digest (the sha256 of
its row indices, `subset_digest`). With `ways`, the run is W-way: the probe is fitted on those
W classes and scored on the test images of those W classes only (classes renumbered 0..W-1 in
ascending order), as N-way K-shot evaluation does. Multi-label datasets are refused with one
line: an episode draws k images per class, and a multi-label image has no single class.

Files. An episode file (JSON, FILE_FORMAT) names the dataset, its file's MD5 and the train
split's size, and lists each episode's seed, shots, ways, row indices (0-based rows of the
official train split) and digest. Loading one checks the dataset, the MD5, that every digest
matches its rows, and then evaluates on exactly those rows; an episode whose rows are the ones
medfm draws for its (seed, shots, ways, episode) gets the key of a drawn episode (so loading a
file exported here reruns nothing), any other set of rows is keyed by its digest.

Summary. `episode_summary` groups a registry frame's episodic rows by everything but the
episode, and gives each metric's mean over episodes and the 95% interval of that mean,
mean +- 1.96 * sd / sqrt(n) (sample sd), the few-shot literature's convention.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medfm.data import Task
from medfm.errors import InvalidArgumentError
from medfm.resolve.keys import canonical_json
from medfm.sampling import SubsetSpec, expand_episodes, indices_digest, sample

FILE_FORMAT = "medfm-episodes/1"  # the "format" field of an episode file
Z_95 = 1.959963984540054  # normal quantile of a two-sided 95% interval
EPISODE_FILE_BYTES_MAX = 256 * 1024 * 1024  # an episode file medfm reads (256 MiB)


def _dataset_line(flag: str, digest: str) -> str:
    return f"{flag} (data MD5 {digest[:8]})"


def episodes_document(*, dataset: str, data_digest: str, labels: np.ndarray, task: Task,
                      specs: list[SubsetSpec]) -> dict:
    """The episode file's content for these episode specs, drawn from the train `labels`."""
    episodes = []
    for spec in specs:
        subset = sample(labels, task, spec)
        episodes.append({"seed": spec.seed, "shots": spec.shots, "ways": spec.ways,
                         "episode": spec.episode, "digest": subset.digest,
                         "rows": subset.indices.tolist()})
    return {"format": FILE_FORMAT, "dataset": dataset, "data_digest": data_digest,
            "split": "train", "n_train": int(len(labels)), "episodes": episodes}


def export_episodes(path: str | os.PathLike, *, dataset: str, data_digest: str,
                    labels: np.ndarray, task: Task, shots, seeds, episodes: int,
                    ways: int | None = None) -> Path:
    """Write the episodes (every shots x seed x episode) to `path` (JSON); returns the path."""
    specs = expand_episodes(shots, seeds, episodes, ways)
    document = episodes_document(dataset=dataset, data_digest=data_digest, labels=labels,
                                 task=task, specs=specs)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_episode_file(path: str | os.PathLike) -> dict:
    """An episode file's content, checked for shape; one line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"episode file {path} does not exist; write one with "
                                   "`medfm episodes export`.")
    if path.stat().st_size > EPISODE_FILE_BYTES_MAX:
        raise InvalidArgumentError(f"episode file {path} is over {EPISODE_FILE_BYTES_MAX:,} "
                                   "bytes; split it.")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgumentError(f"episode file {path} is not JSON ({err}).") from None
    if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
        raise InvalidArgumentError(f"{path} is not a medfm episode file (format "
                                   f"{FILE_FORMAT!r}).")
    episodes = document.get("episodes")
    if not isinstance(episodes, list) or not episodes:
        raise InvalidArgumentError(f"episode file {path} lists no episodes.")
    for i, ep in enumerate(episodes):
        ok = (isinstance(ep, dict) and isinstance(ep.get("rows"), list)
              and all(isinstance(r, int) and not isinstance(r, bool) for r in ep["rows"])
              and isinstance(ep.get("shots"), int) and isinstance(ep.get("seed"), int)
              and isinstance(ep.get("episode"), int))
        if not ok:
            raise InvalidArgumentError(f"episode file {path}: entry {i} needs integer seed, "
                                       "shots, episode and a list of integer rows.")
        if indices_digest(np.unique(np.asarray(ep["rows"], dtype=np.int64))) != ep.get("digest"):
            raise InvalidArgumentError(f"episode file {path}: episode {ep['episode']} (seed "
                                       f"{ep['seed']}) does not match its digest; the file was "
                                       "edited or damaged.")
    return document


def load_episodes(path: str | os.PathLike, *, dataset: str, data_digest: str,
                  labels: np.ndarray, task: Task) -> list[SubsetSpec]:
    """The SubsetSpecs of an episode file's episodes, for a store of `dataset` whose file has
    MD5 `data_digest` and whose train split has these labels (module docstring)."""
    document = read_episode_file(path)
    if document.get("dataset") != dataset or document.get("data_digest") != data_digest:
        theirs = _dataset_line(str(document.get("dataset")), str(document.get("data_digest")))
        raise InvalidArgumentError(
            f"episode file {path} is for {theirs}, not {_dataset_line(dataset, data_digest)}; "
            "probe the stores of its dataset.")
    if document.get("n_train") != len(labels):
        raise InvalidArgumentError(f"episode file {path} was drawn from a train split of "
                                   f"{document.get('n_train')} images, not {len(labels)}.")
    specs = []
    for ep in document["episodes"]:
        drawn = SubsetSpec(shots=ep["shots"], seed=ep["seed"], episode=ep["episode"],
                           ways=ep.get("ways"))
        if sample(labels, task, drawn).digest == ep["digest"]:
            specs.append(drawn)  # medfm's own draw: the key of a drawn episode
        else:
            specs.append(replace(drawn, rows=tuple(ep["rows"])))
    return specs


# -- W-way episodes: the probe sees only the episode's classes -------------------------------

@dataclass(frozen=True)
class WayView:
    """A store's arrays restricted to an episode's classes (renumbered 0..W-1)."""

    arrays: object  # medfm.probe.run.StoreArrays of the kept rows
    train_rows: np.ndarray  # the episode's rows, as positions in the kept train rows
    task: Task  # BINARY for 2 ways, else MULTI_CLASS
    n_classes: int  # W


def way_view(arrays, indices: np.ndarray, task: Task) -> WayView:
    """`arrays` (StoreArrays) restricted to the classes of the episode rows `indices`."""
    classes = np.unique(np.asarray(arrays.targets["train"])[indices])
    features, labels, targets = {}, {}, {}
    for split, y in arrays.targets.items():
        keep = np.flatnonzero(np.isin(np.asarray(y), classes))
        features[split] = arrays.features[split][keep]
        renumbered = np.searchsorted(classes, np.asarray(y)[keep])
        targets[split] = renumbered
        labels[split] = renumbered[:, None].astype(arrays.labels[split].dtype)
        if split == "train":
            train_rows = np.searchsorted(keep, indices)
    kept = type(arrays)(features, labels, targets)
    return WayView(kept, train_rows, Task.BINARY if len(classes) == 2 else Task.MULTI_CLASS,
                   len(classes))


# -- summary -----------------------------------------------------------------------------------

EPISODE_PARAMS = ("episode", "episode_rows")  # params that tell one episode from another


def is_episodic(params: str) -> bool:
    return "episode" in json.loads(params)


def without_episode(params: str) -> str:
    """A run's params without what names its episode: equal for every episode of one setting."""
    return canonical_json({k: v for k, v in json.loads(params).items()
                           if k not in EPISODE_PARAMS})


def interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% interval, mean +- Z_95 * sd / sqrt(n)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan, math.nan
    half = Z_95 * float(values.std(ddof=1)) / math.sqrt(values.size)
    return mean, mean - half, mean + half


def episode_summary(frame, metrics=("acc", "auc", "balanced_acc")):
    """Per (dataset, size, backbone, method, settings, shots): the numbers of seeds and episodes
    (all seeds' episodes pooled) and each metric's mean with its 95% interval over episodes
    (module docstring). `frame` is Registry.to_dataframe()'s; other rows are left out."""
    import pandas as pd

    episodic = frame[frame["params"].map(is_episodic)] if len(frame) else frame
    if episodic.empty:
        return pd.DataFrame()
    episodic = episodic.assign(setting=episodic["params"].map(without_episode))
    keys = ["dataset", "size", "backbone", "method", "setting", "shots"]
    rows = []
    for values, runs in episodic.groupby(keys, sort=True):
        row = dict(zip(keys, values, strict=True))
        row["size"], row["shots"] = int(row["size"]), int(row["shots"])  # float beside NaNs
        row["seeds"], row["episodes"] = runs["seed"].nunique(), len(runs)
        for metric in metrics:
            row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = interval(runs[metric])
        rows.append(row)
    return pd.DataFrame(rows)
