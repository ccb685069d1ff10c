"""k-nearest-neighbour probe (`--method knn`) on frozen features (MedMNIST+ uses k = 11).

    from medfm.probe import KNNProbe
    proba = KNNProbe(k=11, metric="cosine").fit(X_train, y_train).predict_proba(X_test)

Protocol. No standardization and no hyper-parameter search: for each query the k nearest
training rows (cosine similarity of L2-normalized features, or Euclidean distance) vote, and
predict_proba is the fraction of votes per class ((N, 2) binary, (N, K) multi-class); multi-label
gives the mean of the neighbours' label vectors (N, L). With fewer than k training rows all of
them vote. Queries are scored in blocks of QUERY_BLOCK rows with torch matmuls, so a
90k x 1280 training matrix never needs more than a (QUERY_BLOCK, N) similarity block.

`vote="majority"` is MedMNIST+'s kNN as their evaluate.py runs it (lines 88 and 119; utils.py
lines 135-159): the neighbours come from scikit-learn's NearestNeighbors (ball tree, Euclidean on
the features as they are; cosine: on L2-normalized ones, the same order), and each query gets
the neighbours' most common class (ties: the lowest class, as scipy's mode) as a one-hot score,
or per label the majority (mean > 0.5). ACC is then theirs exactly; they report no AUC for kNN,
and the AUC medfm computes from these hard scores is not comparable to a probe's.
"""

from __future__ import annotations

import numpy as np

from medfm.data import Task
from medfm.errors import InvalidArgumentError
from medfm.probe.estimator import ProbeEstimator
from medfm.probe.methods import Fitted, register
from medfm.probe.targets import encode_targets
from medfm.resolve.methods.knn import KNN_K, KNN_METRICS, KNN_VOTES
from medfm.runtime import device_type

QUERY_BLOCK = 1024  # queries per similarity block: (1024, N) float32


class KNNProbe(ProbeEstimator):
    """Neighbour-vote probe (module docstring). Learned: `classes_`, `task_`, `k_` (effective k)."""

    def __init__(self, *, k: int = KNN_K, metric: str = "cosine", vote: str = "fraction",
                 device: str | None = None):
        self.k = k
        self.metric = metric
        self.vote = vote
        self.device = device

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None,
            y_val: np.ndarray | None = None) -> KNNProbe:
        """Keep the training rows and their one-hot (or multi-label) votes; val is not used."""
        if self.metric not in KNN_METRICS:
            raise InvalidArgumentError(
                f"unknown kNN metric {self.metric!r}; use one of {', '.join(KNN_METRICS)}.")
        if self.vote not in KNN_VOTES:
            raise InvalidArgumentError(
                f"unknown kNN vote {self.vote!r}; use one of {', '.join(KNN_VOTES)}.")
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
        """Vote fractions of the k nearest training rows, float64 (vote="majority": one-hot
        majority class, or 0/1 per label)."""
        if self.vote == "majority":
            return self._majority(X)
        import torch

        device = torch.device(device_type(self.device))
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

    def _majority(self, X: np.ndarray) -> np.ndarray:
        """MedMNIST+'s majority vote of scikit-learn's ball-tree neighbours (module docstring)."""
        from sklearn.neighbors import NearestNeighbors

        train, queries = self.X_, np.ascontiguousarray(X, dtype=np.float32)
        if self.metric == "cosine":
            train, queries = _unit_rows(train), _unit_rows(queries)
        nearest = NearestNeighbors(n_neighbors=self.k_, algorithm="ball_tree").fit(
            train).kneighbors(queries, return_distance=False)  # (N, k)
        votes = self.votes_[nearest].sum(axis=1)  # (N, K) counts, or (N, L) positives
        if self.task_ is Task.MULTI_LABEL:
            return (votes / self.k_ > 0.5).astype(np.float64)
        return np.eye(votes.shape[1])[votes.argmax(axis=1)]  # argmax: the lowest of tied classes


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, np.finfo(X.dtype).tiny)


# -- the method --------------------------------------------------------------------------------

def _fit(features: dict, labels: dict, task: Task, train_rows: np.ndarray, *, params: dict,
         selection: str, seed: int, solver: str, device: str | None) -> Fitted:
    model = KNNProbe(k=params["k"], metric=params["metric"],
                     vote=params.get("vote", KNN_VOTES[0]), device=device)
    model.fit(features["train"][train_rows], labels["train"][train_rows])
    scores = model.predict_proba(features["test"]).astype(np.float32)
    return Fitted(scores, None, {"k_effective": model.k_}, "", device_type(device),
                  model=model)


METHOD = register("knn", fit=_fit)
