"""Seconds of one probe or fine-tune row's test metrics (`medfm.metrics.evaluate`: ACC, AUC,
balanced accuracy, ECE, Brier, NLL, each with a 1,000-resample bootstrap interval) on every
MedMNIST test split's shape, and what they add up to over a grid.

    python benchmarks/metrics_bench.py                  # all 12 datasets
    python benchmarks/metrics_bench.py --datasets tissuemnist,pathmnist --repeats 3

Scores are synthetic (labels drawn at the split's size and task, scores with signal about
them): the cost depends on the shape, not on the values. Each dataset is timed `--repeats`
times in this process, best kept; the last line is the sum over the 12 datasets, the cost of
one row per dataset (a grid row of the seed paper's 816 stores: 68 per dataset).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from medfm.data import DATASETS, Task
from medfm.metrics import evaluate


def synthetic_scores(task: Task, n: int, k: int, rng: np.random.Generator):
    """(y_true as in the npz, y_score) of a split of n samples and k classes or labels."""
    if task is Task.MULTI_LABEL:
        y = (rng.random((n, k)) < 0.1).astype(np.uint8)
        return y, (1 / (1 + np.exp(-(2 * y + rng.normal(size=y.shape) - 2)))).astype(np.float32)
    y = rng.integers(0, k, size=(n, 1)).astype(np.uint8)
    logits = 2 * np.eye(k)[y[:, 0]] + rng.normal(size=(n, k))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return y, (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    total = 0.0
    print(f"{'dataset':15s} {'task':26s} {'test':>7s} {'classes':>7s} {'evaluate':>9s}")
    for flag in args.datasets.split(","):
        info = DATASETS[flag]
        n, k = info.n_samples["test"], info.n_classes
        y, s = synthetic_scores(info.task, n, k, rng)
        best = np.inf
        for _ in range(args.repeats):
            started = time.perf_counter()
            evaluate(y, s, info.task, n_bootstrap=1000)
            best = min(best, time.perf_counter() - started)
        total += best
        print(f"{flag:15s} {info.task.value:26s} {n:7d} {k:7d} {best:8.2f}s", flush=True)
    print(f"one row per dataset: {total:.1f} s of test metrics")


if __name__ == "__main__":
    main()
