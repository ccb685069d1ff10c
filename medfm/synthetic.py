"""Synthetic MedMNIST npz files in the official layout, for tests, demos and benchmarks.

    from medfm.synthetic import write_synthetic_npz
    write_synthetic_npz(root, "chestmnist", size=28, n=(40, 10, 20))

Images carry a class-dependent pattern so that features separate the classes and probes learn.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medfm.data import SPLITS, Task, check_size, get_dataset

CODE_SEED = 20250101  # seeds the class -> pattern codes shared by every split


def synthetic_arrays(
    flag: str, size: int, n: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) shaped and typed as `flag`'s npz: images uint8, labels uint8 (N, L)."""
    info = get_dataset(flag)
    rng = np.random.default_rng(seed)
    k = info.n_classes
    # class -> 8-dim code: fixed per dataset (not per seed or split), so train, val and test share
    # the class patterns and a probe trained on one split transfers to the others
    codes = np.random.default_rng(CODE_SEED).normal(size=(k, 8)).astype(np.float32)
    if info.task is Task.MULTI_LABEL:
        labels = (rng.random((n, k)) < 0.3).astype(np.uint8)
        signal = labels.astype(np.float32) @ codes
    else:
        labels = (np.arange(n) % k)[rng.permutation(n)].astype(np.uint8)[:, None]
        signal = codes[labels[:, 0]]
    # (N, 8) class code -> smooth spatial pattern: each code entry scales one sinusoid
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    bases = np.stack([np.sin((i + 1) * np.pi * (xx if i % 2 else yy)) for i in range(8)])
    pattern = np.tensordot(signal, bases, axes=1)  # (N, size, size)
    noise = rng.normal(scale=0.5, size=pattern.shape)
    images = np.clip(128 + 30 * (pattern + noise), 0, 255).astype(np.uint8)
    if info.n_channels == 3:
        images = np.stack([images, images[:, ::-1], images[:, :, ::-1]], axis=-1)
    return images, labels


def write_synthetic_npz(
    root: str | os.PathLike,
    flag: str,
    size: int = 28,
    n: tuple[int, int, int] = (64, 16, 32),
    seed: int = 0,
) -> Path:
    """Write `{flag}[_{size}].npz` under `root`, n = (train, val, test) rows; returns the path."""
    info = get_dataset(flag)
    size = check_size(size)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, (split, rows) in enumerate(zip(SPLITS, n, strict=True)):
        images, labels = synthetic_arrays(flag, size, rows, seed=seed * 3 + i)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels
    path = root / info.filename(size)
    np.savez(path, **arrays)  # uncompressed, like the official files
    return path


def write_feature_store(workdir: str | os.PathLike, dataset: str, features: dict,
                        labels: dict, *, backbone: str = "synthetic.features", size: int = 28,
                        dtype: str = "float16") -> Path:
    """A finished feature store of given features (split -> (N, D)) and labels (split -> (N, L)),
    named and identified like an extracted one: for probe tests and benchmarks that need a
    store of a shape no real backbone gives (PathMNIST-sized, say) without extracting it."""
    # the store layer (h5py) only for the tests and benchmarks that write a store
    from medfm.resolve.keys import store_filename
    from medfm.resolve.store import FEATURE_KIND
    from medfm.store.features import StoreWriter, stores_dir

    identity = {"dataset": dataset, "size": size, "data_digest": "synthetic",
                "backbone": backbone, "weights": "random", "resize_policy": "native",
                "input_size": size, "mean": [0.5] * 3, "std": [0.5] * 3,
                "normalize": "backbone", "feature_kind": FEATURE_KIND, "dtype": dtype}
    path = stores_dir(workdir) / store_filename(identity)
    dim = next(iter(features.values())).shape[1]
    writer = StoreWriter(path, identity, dim=dim, labels=labels,
                         attrs={"backbone_name": backbone, "dataset": dataset})
    for split in SPLITS:
        writer.write(split, 0, features[split])
    return writer.finalize()
