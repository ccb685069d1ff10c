"""Zero-shot scores from image and text embeddings.

    clf = ZeroShotClassifier(text, columns=len(sets), task=Task.BINARY)  # text: TextEmbeddings
    proba = clf.predict_proba(stored_test_features)                      # (N, C) float64

Both sides are L2-normalized; a prompt set's embedding is the mean of its templates' normalized
embeddings, normalized again. logits = logit_scale * cos(image, class) + logit_bias.
Binary, multi-class and ordinal: the softmax of the logits over classes (the bias cancels).
Multi-label: per label the softmax over its (absent, present) pair of logits, i.e.
sigmoid(logit_scale * (cos(image, present) - cos(image, absent))): P(label present).
"""

from __future__ import annotations

import numpy as np

from medfm.data import Task
from medfm.probe.estimator import ProbeEstimator


def unit_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), np.finfo(np.float64).tiny)


def set_embeddings(text, n_sets: int) -> np.ndarray:
    """(n_sets, D): each prompt set's ensembled, normalized text embedding (the texts are the
    sets' templates in order, equally many per set)."""
    per_set = unit_rows(text.embeddings).reshape(n_sets, -1, text.embeddings.shape[1])
    return unit_rows(per_set.mean(axis=1))


class ZeroShotClassifier(ProbeEstimator):
    """Scores test features against class prompts (module docstring); nothing is fitted."""

    def __init__(self, *, text=None, n_sets: int = 0, task: Task = Task.MULTI_CLASS):
        self.text = text  # medfm.probe.zeroshot.text.TextEmbeddings
        self.n_sets = n_sets
        self.task = task
        self.task_ = Task.MULTI_CLASS if Task(task) is Task.ORDINAL else Task(task)
        n_columns = n_sets // 2 if self.task_ is Task.MULTI_LABEL else n_sets
        self.classes_ = np.arange(n_columns)

    def logits(self, X: np.ndarray) -> np.ndarray:
        """(N, n_sets) logit_scale * cosine + logit_bias."""
        images = unit_rows(self.text.image_embeddings(X))
        classes = set_embeddings(self.text, self.n_sets)
        return self.text.logit_scale * images @ classes.T + self.text.logit_bias

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        logits = self.logits(X)
        if self.task_ is Task.MULTI_LABEL:
            present, absent = logits[:, 0::2], logits[:, 1::2]
            return 1.0 / (1.0 + np.exp(-(present - absent)))
        logits = logits - logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)
