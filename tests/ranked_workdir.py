"""A work directory for leaderboard and bundle tests: 4 backbones x 4 datasets, probed for real.

Two datasets are the real MedMNIST files (BreastMNIST, PneumoniaMNIST, 28 px), two synthetic
(BloodMNIST, OrganAMNIST). Each "backbone" is a fixed random projection of the images (of its
own width, so they differ in quality) stored as a finished feature store, then probed by
`medfm.probe.probe` (kNN: no fit, so seconds) at two fractions and two seeds: real registry rows
with per-sample scores. The fourth backbone has no store for
OrganAMNIST, so every block has a backbone missing a dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfm.data import SPLITS, load_split
from medfm.probe import probe
from medfm.synthetic import write_feature_store

REAL = ("breastmnist", "pneumoniamnist")  # from the real data folder
SYNTHETIC = ("bloodmnist", "organamnist")  # from the synthetic data folder
DATASETS = (*REAL, *SYNTHETIC)
BACKBONES = {"proj4_net.t": 4, "proj16_net.t": 16, "proj32_net.t": 32, "partial_net.t": 24}
PARTIAL = ("partial_net.t", "organamnist")  # (backbone, dataset) with no store
FRACTIONS = (0.1, 1.0)
SEEDS = (0, 1)
TRAIN_ROWS_MAX = 600  # PneumoniaMNIST's 4,708 training images cut to keep the fits fast


def _features(images: np.ndarray, width: int, seed: int) -> np.ndarray:
    """(N, H, W[, C]) uint8 -> (N, width) float32: a seeded random projection, then tanh."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    weights = np.random.default_rng(seed).normal(size=(flat.shape[1], width)) / 8.0
    return np.tanh((flat - flat.mean(axis=1, keepdims=True)) @ weights).astype(np.float32)


def build(workdir: Path, real_root: Path, synthetic_root: Path) -> Path:
    """Write the stores and probe them into `workdir`; returns `workdir`."""
    for dataset in DATASETS:
        root = real_root if dataset in REAL else synthetic_root
        splits = {split: load_split(dataset, 28, split, data_root=root) for split in SPLITS}
        splits["train"] = tuple(a[:TRAIN_ROWS_MAX] for a in splits["train"])
        for seed, (backbone, width) in enumerate(BACKBONES.items()):
            if (backbone, dataset) == PARTIAL:
                continue
            write_feature_store(
                workdir, dataset, {s: _features(x, width, seed) for s, (x, _) in splits.items()},
                {s: y for s, (_, y) in splits.items()}, backbone=backbone)
    probe(workdir=workdir, fractions=list(FRACTIONS), seeds=list(SEEDS), method="knn",
          progress=False)
    return workdir
