"""Wall time of a full probe (C sweep, 3 fractions x 3 seeds) per backend, beside a naive baseline.

    python benchmarks/probe_bench.py                       # both workloads, every backend
    python benchmarks/probe_bench.py --skip-real --backends torch

Workloads: (a) the real PneumoniaMNIST Lite0 store (tf_efficientnet_lite0.in1k, 28 px source,
built with medfm.extract into the benchmark workdir if missing; needs $MEDFM_DATA_ROOT), and
(b) synthetic features shaped like PathMNIST (89,996 / 10,004 / 7,180 x 1280, 9 classes, float16
store). The naive baseline fits a fresh scikit-learn LogisticRegression at every C of the same
grid with no warm start, on seed 0 of each fraction, and is multiplied by the number of seeds
(seeds only change which images are drawn). Targets on the 2-core CPU: (a) < 10 s, (b) < 120 s,
and >= 3x faster than the naive baseline.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from medfm.data import SPLITS
from medfm.probe import C_GRID, probe
from medfm.probe.backends import cuda_available, cuml_available
from medfm.probe.run import StoreArrays
from medfm.sampling import SubsetSpec, sample
from medfm.store.features import FeatureStore, StoreKey, StoreWriter, find_stores, stores_dir

FRACTIONS = (0.01, 0.1, 1.0)
SEEDS = (0, 1, 2)
PATH_ROWS = {"train": 89_996, "val": 10_004, "test": 7_180}  # PathMNIST split sizes
PATH_DIM, PATH_CLASSES = 1280, 9  # EfficientNet-Lite0 / -B0 pooled width, PathMNIST classes


def synthetic_pathmnist(workdir: Path) -> FeatureStore:
    """A PathMNIST-shaped store: non-negative (post-ReLU-like) features from 9 overlapping
    clusters in a 32-d latent space, projected to 1280-d with noise."""
    key = StoreKey(dataset="pathmnist", size=28, arch="synthetic_lite0", tag="bench",
                   weights_digest="synthetic", resize_policy="bilinear", input_size=224)
    path = stores_dir(workdir) / key.filename()
    if path.exists():
        return FeatureStore(path)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(PATH_CLASSES, 32)) * 0.7
    projection = rng.normal(size=(32, PATH_DIM)).astype(np.float32) / 4
    labels = {s: rng.integers(0, PATH_CLASSES, (n, 1)).astype(np.uint8)
              for s, n in PATH_ROWS.items()}
    writer = StoreWriter(path, key, dim=PATH_DIM, labels=labels, attrs={})
    for split in SPLITS:
        latent = centers[labels[split][:, 0]] + rng.normal(size=(len(labels[split]), 32))
        noise = rng.normal(size=(len(latent), PATH_DIM)).astype(np.float32)
        writer.write(split, 0, np.maximum(latent.astype(np.float32) @ projection + noise, 0))
    writer.finalize()
    return FeatureStore(path)


def real_pneumonia(workdir: Path) -> FeatureStore:
    from medfm.extract import extract

    found = find_stores(workdir, dataset="pneumoniamnist", backbone="tf_efficientnet_lite0")
    if not found:
        extract(dataset="pneumoniamnist", backbone="tf_efficientnet_lite0.in1k", size=28,
                workdir=workdir)
        found = find_stores(workdir, dataset="pneumoniamnist", backbone="tf_efficientnet_lite0")
    return found[0]


def naive_seconds(store: FeatureStore) -> float:
    """Fresh LogisticRegression per C (no warm start), seed 0 of each fraction, times seeds."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    arrays = StoreArrays.load(store)
    y_train, y_val = arrays.labels["train"][:, 0], arrays.labels["val"][:, 0]
    started = time.perf_counter()
    for fraction in FRACTIONS:
        rows = sample(y_train, "multi-class", SubsetSpec(fraction=fraction, seed=0)).indices
        scaler = StandardScaler().fit(arrays.features["train"][rows])
        X, Xv = scaler.transform(arrays.features["train"][rows]), scaler.transform(
            arrays.features["val"])
        for C in C_GRID:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                LogisticRegression(C=C, max_iter=100).fit(X, y_train[rows]).score(Xv, y_val)
    return (time.perf_counter() - started) * len(SEEDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medfm-bench"))
    parser.add_argument("--backends", default=None, help="comma list; default: every available")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    backends = (args.backends.split(",") if args.backends else
                ["sklearn", "torch"] + (["cuml"] if cuml_available() else []))
    workloads = {"(b) synthetic PathMNIST 90k x 1280 x 9": synthetic_pathmnist}
    if not args.skip_real:
        workloads = {"(a) PneumoniaMNIST Lite0 (real)": real_pneumonia, **workloads}
    print(f"grid {len(C_GRID)} C values; fractions {FRACTIONS} x seeds {SEEDS}; "
          f"cuda={cuda_available()}")
    for name, build in workloads.items():
        store = build(workdir)
        for backend in backends:
            report = probe(store=store.path, fractions=FRACTIONS, seeds=SEEDS, backend=backend,
                           workdir=workdir, force=True, progress=False)
            fit_s = sum(r.wall_s for r in report.computed)
            best = max(report.computed, key=lambda r: r.key.fraction)
            print(f"{name:42s} {backend:8s} {report.wall_s:7.1f} s total ({fit_s:.1f} s in runs)"
                  f"  fraction 1.0: acc {best.acc:.4f} auc {best.auc:.4f} C {best.chosen_C:g}")
        if not args.skip_naive:
            print(f"{name:42s} {'naive':8s} {naive_seconds(store):7.1f} s (sklearn, fresh fit "
                  f"per C, seed 0 x {len(SEEDS)})")


if __name__ == "__main__":
    main()
