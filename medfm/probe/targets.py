"""Label encoding, probabilities and the selection metric shared by the logistic and kNN probes.

A probe infers its task from the labels it is fitted on, as scikit-learn does:
- (N, L) 0/1 labels with L > 1: multi-label (ChestMNIST), scored per label;
- (N,) or (N, 1) class ids with two classes: binary, predict_proba (N, 2);
- otherwise multi-class (ordinal RetinaMNIST too: MedMNIST scores it as multi-class).
What chooses a probe's hyper-parameter on a selection split (`SELECT_BY`):
- `loss`: the mean log-loss of the true labels (medfm.metrics.nll), lower is better. It moves
  with every change of the probabilities, so it has no plateaus for solver noise to break;
- `primary`: the dataset's primary metric, MedMNIST ACC (AUC for multi-label), higher is better:
  a step function on small splits (one BreastMNIST val image is 1.3 points of ACC).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfm.data import Task
from medfm.errors import InvalidArgumentError
from medfm.metrics import acc, auc, nll



@dataclass(frozen=True)
class Targets:
    """Labels encoded for fitting: class indices 0..K-1, or the (N, L) 0/1 matrix."""

    task: Task  # BINARY, MULTI_CLASS or MULTI_LABEL (ordinal is fitted as multi-class)
    classes: np.ndarray  # (K,) original class ids; multi-label: arange(L)
    encoded: np.ndarray  # (N,) int64 class index, or (N, L) int64 0/1


def encode_targets(y: np.ndarray) -> Targets:
    """Infer the task from `y` and encode it (see the module docstring)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        if not np.isin(y, (0, 1)).all():
            raise InvalidArgumentError(
                f"multi-label targets must be 0/1; got values {np.unique(y)[:5]}.")
        return Targets(Task.MULTI_LABEL, np.arange(y.shape[1]), y.astype(np.int64))
    y = y.reshape(-1)
    classes, encoded = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise InvalidArgumentError(
            f"the training labels hold only class {classes.tolist()}; a probe needs at least two "
            "classes (use a larger fraction or more shots).")
    task = Task.BINARY if classes.size == 2 else Task.MULTI_CLASS
    return Targets(task, classes, encoded.astype(np.int64))


def encode_like(y: np.ndarray, targets: Targets) -> np.ndarray:
    """Encode labels of another split (val, holdout) in the training encoding; classes unseen in
    training map to -1 (they count as errors)."""
    y = np.asarray(y)
    if targets.task is Task.MULTI_LABEL:
        return y.reshape(len(y), -1).astype(np.int64)
    y = y.reshape(-1)
    position = np.searchsorted(targets.classes, y).clip(0, targets.classes.size - 1)
    return np.where(targets.classes[position] == y, position, -1).astype(np.int64)


def selection_metrics(y_encoded: np.ndarray, proba: np.ndarray, task: Task) -> dict[str, float]:
    """{"loss": mean log-loss, primary_metric(task): its value} of `proba` on encoded labels.

    ACC counts rows of classes unseen in training (encoded -1) as errors; the loss leaves them
    out (their probability is 0 at every C, a constant that changes no choice). Multi-label AUC
    is the mean over the labels that have both positives and negatives here (NaN when none has).
    """
    if task is Task.MULTI_LABEL:
        per_label = [auc(y_encoded[:, j], proba[:, j], Task.BINARY)
                     for j in range(y_encoded.shape[1])
                     if 0 < y_encoded[:, j].sum() < len(y_encoded)]
        return {"loss": nll(y_encoded, proba, task),
                "auc": float(np.mean(per_label)) if per_label else float("nan")}
    seen = y_encoded >= 0
    loss = nll(y_encoded[seen], proba[seen], task) if seen.any() else float("nan")
    if task is Task.BINARY:
        return {"loss": loss, "acc": acc(y_encoded, proba, Task.BINARY)}
    return {"loss": loss, "acc": float(np.mean(np.argmax(proba, axis=1) == y_encoded))}


def predict_from_proba(proba: np.ndarray, targets_task: Task, classes: np.ndarray) -> np.ndarray:
    """Hard predictions as MedMNIST's ACC makes them: argmax, or probability > 0.5 for binary
    (of class 1) and multi-label (per label)."""
    if targets_task is Task.MULTI_LABEL:
        return (proba > 0.5).astype(np.int64)
    if targets_task is Task.BINARY:
        return classes[(proba[:, 1] > 0.5).astype(np.int64)]
    return classes[np.argmax(proba, axis=1)]
