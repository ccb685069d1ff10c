"""k-nearest-neighbour probe on frozen features (MedMNIST+ uses k = 11).

    from medfm.probe import KNNProbe
    proba = KNNProbe(k=11, metric="cosine").fit(X_train, y_train).predict_proba(X_test)

Protocol. No standardization and no hyper-parameter search: for each query the k nearest
training rows (cosine similarity of L2-normalized features, or Euclidean distance) vote, and
predict_proba is the fraction of votes per class ((N, 2) binary, (N, K) multi-class); multi-label
gives the mean of the neighbours' label vectors (N, L). With fewer than k training rows all of
them vote. Queries are scored in blocks of QUERY_BLOCK rows with torch matmuls, so a
90k x 1280 training matrix never needs more than a (QUERY_BLOCK, N) similarity block.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from medfm.data import Task
from medfm.errors import InvalidArgumentError
from medfm.probe.settings import KNN_K, KNN_METRICS
from medfm.probe.targets import encode_targets, predict_from_proba

QUERY_BLOCK = 1024  # queries per similarity block: (1024, N) float32


class KNNProbe(ClassifierMixin, BaseEstimator):
    """Neighbour-vote probe (module docstring). Learned: `classes_`, `task_`, `k_` (effective k)."""

    def __init__(self, *, k: int = KNN_K, metric: str = "cosine", device: str | None = None):
        self.k = k
        self.metric = metric
        self.device = device

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None,
            y_val: np.ndarray | None = None) -> KNNProbe:
        """Keep the training rows and their one-hot (or multi-label) votes; val is not used."""
        if self.metric not in KNN_METRICS:
            raise InvalidArgumentError(
                f"unknown kNN metric {self.metric!r}; use one of {', '.join(KNN_METRICS)}.")
        if int(self.k) != self.k or self.k < 1:
            raise InvalidArgumentError(f"k must be a positive integer; got {self.k!r}.")
        targets = encode_targets(y)
        self.task_, self.classes_ = targets.task, targets.classes
        if targets.task is Task.MULTI_LABEL:
            self.votes_ = targets.encoded.astype(np.float32)  # (N, L)
        else:
            self.votes_ = np.eye(len(targets.classes), dtype=np.float32)[targets.encoded]  # (N, K)
        self.X_ = np.ascontiguousarray(X, dtype=np.float32)
        self.k_ = min(int(self.k), len(self.X_))
        self.n_features_in_ = self.X_.shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Vote fractions of the k nearest training rows, float64."""
        import torch

        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        train = torch.as_tensor(self.X_, device=device)  # (N, D)
        votes = torch.as_tensor(self.votes_, device=device)  # (N, K)
        queries = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=device)
        if self.metric == "cosine":
            train = torch.nn.functional.normalize(train, dim=1)
            queries = torch.nn.functional.normalize(queries, dim=1)
        else:
            train_sq = (train * train).sum(dim=1)  # (N,)
        out = []
        for start in range(0, len(queries), QUERY_BLOCK):
            block = queries[start:start + QUERY_BLOCK]  # (B, D)
            closeness = block @ train.T  # (B, N): cosine similarity
            if self.metric == "euclidean":  # -(squared distance) up to a per-query constant
                closeness = 2.0 * closeness - train_sq
            nearest = closeness.topk(self.k_, dim=1).indices  # (B, k)
            out.append(votes[nearest].mean(dim=1))  # (B, K)
        return torch.cat(out).double().cpu().numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class ids (majority; binary: vote share of class 1 > 0.5), or (N, L) 0/1."""
        return predict_from_proba(self.predict_proba(X), self.task_, self.classes_)

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """MedMNIST ACC of `predict` (multi-label: mean per-label accuracy at 0.5)."""
        pred = self.predict(X)
        return float(np.mean(pred == np.asarray(y).reshape(pred.shape)))
