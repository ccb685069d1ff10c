"""The probe stage: probes fitted on feature stores, over fractions or shots x seeds, one registry
row per run.

    from medfm.probe import probe
    report = probe(dataset="breastmnist", fractions=[0.1, 0.3, 1.0], seeds=[0, 1, 2])
    report.computed, report.skipped, report.wall_s

    medfm probe --dataset breastmnist --fractions 0.1,0.3,1.0 --seeds 0,1,2

Order of work. `probe` finds every matching store (reading attributes only), plans one ResultKey
per (store, subset spec, seed), asks the registry in one query which are finished, and only then
reads features, each store's once, for the rest. Each run (`probe_job`, a pure job function
that writes nothing) draws its training subset with medfm.sampling, fits the probe
(LogisticProbe: C chosen on val or a holdout; KNNProbe), scores the test split and computes
MedMNIST ACC/AUC, balanced accuracy and bootstrap CIs on the float32 scores it returns;
`probe_store` writes its row with those per-sample test scores.
Runs whose training data and settings are identical (fraction 1.0 under several seeds with
val selection: the same images, the same deterministic fit) share one fit; their rows say so in
`extra["shared_fit"]`. A finished key is never rerun unless `force=True`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medfm import __version__
from medfm.data import SPLITS, Task, get_dataset
from medfm.errors import InvalidArgumentError, StoreError
from medfm.metrics import evaluate
from medfm.probe.backends import DEFAULT_MAX_ITER, DEFAULT_TOL, resolve_backend
from medfm.probe.settings import C_GRID, HOLDOUT_FRACTION, KNN_K, KNN_METRICS, SELECTIONS
from medfm.sampling import SubsetSpec, sample
from medfm.store.features import FeatureStore, find_stores
from medfm.store.registry import Registry, ResultKey, ResultRow, canonical_json

PROBE_METHODS = ("logreg", "knn")  # values of --method
DEFAULT_FRACTIONS = (1.0,)  # when neither fractions nor shots are given
DEFAULT_SEEDS = (0, 1, 2)
N_BOOTSTRAP = 1000  # resamples per test-metric confidence interval
KNN_SELECTION = "none"  # kNN chooses nothing: its keys carry this selection
KNN_BACKEND = "torch"  # kNN's compute engine, recorded as its backend


@dataclass(frozen=True)
class StoreArrays:
    """A store's features (float32) and labels for every split, read once."""

    features: dict  # split -> (N, D) float32
    labels: dict  # split -> (N, L) labels as in the npz

    @classmethod
    def load(cls, store: FeatureStore) -> StoreArrays:
        return cls({s: store.features(s) for s in SPLITS}, {s: store.labels(s) for s in SPLITS})


@dataclass(frozen=True)
class ProbeReport:
    """What one `probe` call did."""

    computed: list  # ResultRow of each run fitted now
    skipped: list  # ResultKey of each planned run already in the registry
    wall_s: float  # seconds for the whole call

    @property
    def planned(self) -> int:
        return len(self.computed) + len(self.skipped)


def method_params(method: str, selection: str, knn_metric: str = "cosine") -> dict:
    """The settings that define a method's result (stored as the key's `params`)."""
    if method == "knn":
        if knn_metric not in KNN_METRICS:
            raise InvalidArgumentError(
                f"unknown kNN metric {knn_metric!r}; use one of {', '.join(KNN_METRICS)}.")
        return {"k": KNN_K, "metric": knn_metric}
    params = {"C_grid": list(C_GRID), "max_iter": DEFAULT_MAX_ITER, "tol": DEFAULT_TOL,
              "standardize": "train-subset"}
    if selection == "holdout":
        params["holdout_fraction"] = HOLDOUT_FRACTION
    return params


def _check_choices(method: str, selection: str) -> None:
    if method not in PROBE_METHODS:
        raise InvalidArgumentError(
            f"unknown probe method {method!r}; use one of {', '.join(PROBE_METHODS)}.")
    if selection not in SELECTIONS:
        raise InvalidArgumentError(
            f"unknown selection {selection!r}; use one of {', '.join(SELECTIONS)}.")


def result_key(store: FeatureStore, spec: SubsetSpec, *, method: str, backend: str,
               selection: str, knn_metric: str = "cosine") -> ResultKey:
    """The registry key of one probe run (`backend` already resolved for logreg)."""
    _check_choices(method, selection)
    knn = method == "knn"
    return ResultKey(
        dataset=store.key.dataset, size=store.key.size, backbone=store.key.arch,
        tag=store.key.tag, weights_digest=store.key.weights_digest,
        resize_policy=store.key.resize_policy, input_size=store.key.input_size,
        feature_kind=store.key.feature_kind, method=method,
        backend=KNN_BACKEND if knn else backend, fraction=spec.fraction, shots=spec.shots,
        seed=spec.seed, selection=KNN_SELECTION if knn else selection,
        params=canonical_json(method_params(method, selection, knn_metric)),
        store_fingerprint=store.fingerprint)


def _versions() -> dict:
    import scipy
    import sklearn
    import torch

    return {"medfm": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "scikit-learn": sklearn.__version__, "torch": torch.__version__}


def _fit_and_score(arrays: StoreArrays, task: Task, train_rows: np.ndarray, key: ResultKey,
                   ) -> tuple[np.ndarray, float | None, dict]:
    """(float32 test scores, chosen C, extra) of one fit on the given training rows."""
    from medfm.probe.knn import KNNProbe  # scikit-learn loads here, once something is fitted
    from medfm.probe.logreg import LogisticProbe

    multi_label = task is Task.MULTI_LABEL

    def labels(split: str, rows=slice(None)) -> np.ndarray:
        y = arrays.labels[split][rows]
        return y if multi_label else y[:, 0]

    X_train = arrays.features["train"][train_rows]
    y_train = labels("train", train_rows)
    if key.method == "knn":
        params = json.loads(key.params)
        model = KNNProbe(k=params["k"], metric=params["metric"]).fit(X_train, y_train)
        extra = {"k_effective": model.k_}
        chosen = None
    else:
        model = LogisticProbe(backend=key.backend, selection=key.selection, random_state=key.seed)
        if key.selection == "val":
            model.fit(X_train, y_train, arrays.features["val"], labels("val"))
        else:  # holdout: the val split is never read
            model.fit(X_train, y_train)
        extra = {"C_grid": list(C_GRID), "path": model.path_, "n_iter": model.n_iter_,
                 "converged": bool(model.converged_),
                 "selection_metric": "auc" if multi_label else "acc"}
        chosen = model.C_
    proba = model.predict_proba(arrays.features["test"])
    n_classes = get_dataset(key.dataset).n_classes
    if not multi_label and not np.array_equal(model.classes_, np.arange(n_classes)):
        raise StoreError(f"the training subset holds classes {model.classes_.tolist()}, not all "
                         f"{n_classes}; rebuild the store from the full train split.")
    return proba.astype(np.float32), chosen, extra


def probe_job(store: FeatureStore, *, spec: SubsetSpec, method: str = "logreg",
              backend: str = "auto", selection: str = "val", knn_metric: str = "cosine",
              arrays: StoreArrays | None = None, shared_fits: dict | None = None,
              ) -> tuple[ResultRow, np.ndarray, np.ndarray]:
    """One probe run, writing nothing: sample the training subset, fit, score the test split.

    Returns (row, float32 test scores, test labels), what `Registry.add` records. `arrays` passes
    features already read; `shared_fits` (a dict the caller keeps) lets runs with identical
    training data and settings share one fit.
    """
    start = time.perf_counter()
    _check_choices(method, selection)
    key = result_key(store, spec, method=method,
                     backend=backend if method == "knn" else resolve_backend(backend),
                     selection=selection, knn_metric=knn_metric)
    arrays = arrays or StoreArrays.load(store)
    task = get_dataset(store.key.dataset).task
    subset = sample(arrays.labels["train"], task, spec)
    holdout_seed = spec.seed if key.selection == "holdout" else None
    fit_id = (store.fingerprint, subset.digest, key.method, key.backend, key.selection,
              key.params, holdout_seed)
    extra_shared = {}
    if shared_fits is not None and fit_id in shared_fits:
        scores, chosen, extra, first = shared_fits[fit_id]
        extra_shared = {"shared_fit": first}
    else:
        scores, chosen, extra = _fit_and_score(arrays, task, subset.indices, key)
        if shared_fits is not None:
            shared_fits[fit_id] = (scores, chosen, extra, key.digest())
    y_test = arrays.labels["test"]
    metrics = evaluate(y_test, scores, task, n_bootstrap=N_BOOTSTRAP, seed=0)
    row = ResultRow(
        key=key, n_train=subset.n, subset_digest=subset.digest, chosen_C=chosen,
        acc=metrics.acc, auc=metrics.auc, balanced_acc=metrics.balanced_acc,
        acc_ci_low=metrics.acc_ci[0], acc_ci_high=metrics.acc_ci[1],
        auc_ci_low=metrics.auc_ci[0], auc_ci_high=metrics.auc_ci[1],
        extra={**extra, **extra_shared}, versions=_versions(),
        wall_s=time.perf_counter() - start)
    return row, scores, y_test


def probe_store(store: FeatureStore, *, spec: SubsetSpec, method: str = "logreg",
                backend: str = "auto", selection: str = "val", knn_metric: str = "cosine",
                registry: Registry | None = None, force: bool = False,
                arrays: StoreArrays | None = None, shared_fits: dict | None = None) -> ResultRow:
    """One probe run (`probe_job`), its row recorded with its test scores in `registry`.

    With a registry, a finished key returns its stored row unless `force`.
    """
    if registry is not None and not force:
        _check_choices(method, selection)
        key = result_key(store, spec, method=method,
                         backend=backend if method == "knn" else resolve_backend(backend),
                         selection=selection, knn_metric=knn_metric)
        found = registry.get(key)
        if found is not None:
            return found
    row, scores, y_test = probe_job(store, spec=spec, method=method, backend=backend,
                                    selection=selection, knn_metric=knn_metric, arrays=arrays,
                                    shared_fits=shared_fits)
    if registry is not None:
        registry.add(row, scores=scores, y_true=y_test, replace=force)
    return row


def _specs(fractions: Sequence[float] | None, shots: Sequence[int] | None,
           seeds: Sequence[int]) -> list[SubsetSpec]:
    if fractions is None and shots is None:
        fractions = DEFAULT_FRACTIONS
    specs = [SubsetSpec(fraction=f, seed=s) for f in fractions or () for s in seeds]
    return specs + [SubsetSpec(shots=k, seed=s) for k in shots or () for s in seeds]


def probe(*, dataset: str | None = None, backbone: str | None = None, size: int | None = None,
          store: str | os.PathLike | None = None, fractions: Sequence[float] | None = None,
          shots: Sequence[int] | None = None, seeds: Sequence[int] = DEFAULT_SEEDS,
          method: str = "logreg", backend: str = "auto", selection: str = "val",
          knn_metric: str = "cosine", workdir: str | os.PathLike | None = None,
          force: bool = False, progress: bool = True) -> ProbeReport:
    """Probe every matching store at every fraction/shots x seed; skip runs already recorded."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    _check_choices(method, selection)
    if store is not None:
        stores = [FeatureStore(store)]
    else:
        flag = get_dataset(dataset).flag if dataset else None
        stores = find_stores(workdir, dataset=flag, backbone=backbone, size=size)
    if not stores:
        wanted = " ".join(f"--{name} {value}" for name, value in
                          (("dataset", dataset), ("backbone", backbone), ("size", size)) if value)
        raise StoreError(f"no feature store matches {wanted or 'anything'} in the work directory; "
                         f"run `medfm extract {wanted}` first.")
    concrete = KNN_BACKEND if method == "knn" else resolve_backend(backend)
    specs = _specs(fractions, shots, seeds)
    plan = [(s, spec, result_key(s, spec, method=method, backend=concrete, selection=selection,
                                 knn_metric=knn_metric))
            for s in stores for spec in specs]
    registry = Registry.in_workdir(workdir)
    done = set() if force else registry.done_keys([key for _, _, key in plan])
    skipped = [key for _, _, key in plan if key.digest() in done]
    pending = [(s, spec) for s, spec, key in plan if key.digest() not in done]
    computed, arrays, shared_fits = [], {}, {}
    for s, spec in tqdm(pending, desc="probe", disable=not progress or not pending):
        if s.path not in arrays:
            arrays = {s.path: StoreArrays.load(s)}  # one store in memory at a time
        computed.append(probe_store(s, spec=spec, method=method, backend=concrete,
                                    selection=selection, knn_metric=knn_metric,
                                    registry=registry, force=force,
                                    arrays=arrays[s.path], shared_fits=shared_fits))
    return ProbeReport(computed=computed, skipped=skipped, wall_s=time.perf_counter() - start)
