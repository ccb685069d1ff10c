"""SimpleShot (`--method simpleshot`): nearest class centroid on frozen features (Wang et al.
2019, "SimpleShot: Revisiting Nearest-Neighbor Classification for Few-Shot Learning").

    from medfm.probe.methods.simpleshot import SimpleShotProbe
    proba = SimpleShotProbe(norm="cl2n").fit(X_train, y_train).predict_proba(X_test)

Protocol. Every feature x (training and test) is transformed as the paper's three variants do:
`un` leaves it as it is; `l2n` divides it by its L2 norm; `cl2n` (the default, the paper's best)
first subtracts the mean of the training subset's features, then divides by the L2 norm. Each
class's centroid is the mean of its transformed training features (not renormalized, as in the
paper's code), and a test image is assigned the class of the nearest centroid in Euclidean
distance. No hyper-parameter is searched and the validation split is not used.
Scores (what AUC and the calibration metrics see) are the softmax over classes of the negative
squared distances to the centroids, so the argmax is the nearest centroid and, for two classes,
P(class 1) > 0.5 exactly when centroid 1 is the nearer; their scale is the features' (not a
calibrated probability). Binary, multi-class and ordinal (as multi-class) datasets; a
multi-label dataset has no single class per image to average, and is refused with one line.
"""

from __future__ import annotations

import numpy as np

from medfm.data import Task
from medfm.errors import InvalidArgumentError
from medfm.probe.estimator import ProbeEstimator
from medfm.probe.methods import Fitted, register
from medfm.probe.targets import encode_targets
from medfm.resolve.methods.simpleshot import NORMS



def refuse_multi_label(task: Task, what: str) -> None:
    """One line for a multi-label dataset where `what` needs one class per image."""
    if Task(task) is Task.MULTI_LABEL:
        raise InvalidArgumentError(
            f"{what} needs one class per image, and this dataset is multi-label; use "
            "--method logreg or knn (fractions or shots) for it.")


class SimpleShotProbe(ProbeEstimator):
    """Nearest-centroid probe (module docstring). Learned: `mean_` (the centring vector, zeros
    unless cl2n), `centroids_` (K, D), `classes_`, `task_`."""

    def __init__(self, *, norm: str = NORMS[0]):
        self.norm = norm

    def fit(self, X: np.ndarray, y: np.ndarray) -> SimpleShotProbe:
        if self.norm not in NORMS:
            raise InvalidArgumentError(
                f"unknown SimpleShot norm {self.norm!r}; use one of {', '.join(NORMS)}.")
        targets = encode_targets(y)
        refuse_multi_label(targets.task, "SimpleShot")
        X = np.asarray(X, dtype=np.float64)
        self.task_, self.classes_ = targets.task, targets.classes
        self.mean_ = X.mean(axis=0) if self.norm == "cl2n" else np.zeros(X.shape[1])
        Z = self.transform(X)
        counts = np.bincount(targets.encoded, minlength=len(self.classes_))
        sums = np.zeros((len(self.classes_), X.shape[1]))
        np.add.at(sums, targets.encoded, Z)
        self.centroids_ = sums / counts[:, None]
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """The features as the chosen variant sees them (centred, L2-normalized)."""
        Z = np.asarray(X, dtype=np.float64) - self.mean_
        if self.norm == "un":
            return Z
        return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), np.finfo(np.float64).tiny)

    def distances(self, X: np.ndarray) -> np.ndarray:
        """(N, K) squared Euclidean distances to the class centroids."""
        Z = self.transform(X)
        return ((Z[:, None, :] - self.centroids_[None, :, :]) ** 2).sum(axis=2)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Softmax over classes of the negative squared distances, float64 (N, K)."""
        logits = -self.distances(X)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)


# -- the method --------------------------------------------------------------------------------

def _fit(features: dict, labels: dict, task: Task, train_rows: np.ndarray, *, params: dict,
         selection: str, seed: int, solver: str, device: str | None) -> Fitted:
    refuse_multi_label(task, "SimpleShot")
    model = SimpleShotProbe(norm=params["norm"])
    model.fit(np.asarray(features["train"])[train_rows], labels["train"][train_rows])
    scores = model.predict_proba(np.asarray(features["test"])).astype(np.float32)
    return Fitted(scores, None, {}, "", "cpu", model=model)


def _save_state(model: SimpleShotProbe) -> dict:
    return {"mean": model.mean_, "centroids": model.centroids_,
            "classes": np.asarray(model.classes_), "task": np.array(model.task_.value),
            "norm": np.array(model.norm)}


def _load_state(state: dict) -> SimpleShotProbe:
    model = SimpleShotProbe(norm=str(state["norm"]))
    model.mean_, model.centroids_ = state["mean"], state["centroids"]
    model.classes_, model.task_ = state["classes"], Task(str(state["task"]))
    return model


METHOD = register("simpleshot", fit=_fit, save_state=_save_state, load_state=_load_state)
