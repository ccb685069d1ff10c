"""Wall time of a full probe (C search, 3 fractions x 3 seeds) per solver, early-stopped vs the
exhaustive walk of the same rule, beside a naive baseline.

    python benchmarks/probe_bench.py                       # both workloads, every solver
    python benchmarks/probe_bench.py --skip-real --solvers auto,torch
    python benchmarks/probe_bench.py --store S.h5 --solvers torch --skip-naive

Workloads: (a) the real PneumoniaMNIST Lite0 store (tf_efficientnet_lite0.in1k, 28 px source,
built with medfm.extract into the benchmark workdir if missing; needs $MEDFM_DATA_ROOT), and
(b) synthetic features shaped like PathMNIST (89,996 / 10,004 / 7,180 x 1280, 9 classes, float16
store). Each solver runs twice, each time in a fresh process (imports count, as for a user):
as `medfm probe` runs it (C by val log-loss, the walk stopped once the loss has risen PATIENCE
C values in a row; medfm.probe.methods.logreg) and with the same rule over the whole grid
("exhaustive"); the stopped run's chosen C and test metrics are compared run by run with the
exhaustive run of the same solver. The naive baseline fits a fresh scikit-learn
LogisticRegression at every C of the grid with no warm start, on seed 0 of each fraction, and is
multiplied by the number of seeds (seeds only change which images are drawn). Targets on the
2-core CPU (issue 9): (b) < 25 s process wall with the exhaustive walk's C and test metrics.

    python benchmarks/probe_bench.py --compare [--device cuda]

`--compare` (issue 25) runs, on (a) and (b), today's reference, the sequential exhaustive walk
(`--solver torch`, the whole grid, torch.optim.LBFGS's iterates), and the new path, `medfm
probe` as it runs by default (solver auto: the batched solver; every C at once on CUDA, the
walk with its cached-logit line search on a CPU), each in a fresh process on `--device`, and
compares them run by run: the chosen C the same or adjacent on the grid, and the largest test
ACC / AUC differences in points. Its last line is
`probe_compare b new_s <s> old_s <s> same_or_adjacent_C <k>/9 max_dacc_pp <x> max_dauc_pp <y>`
(targets: on the 2-core CPU new_s < 25 and <= old_s, 9/9, <= 0.3 and <= 0.1; on a GPU new_s
<= 5, the fits <= 1 s and the test metrics <= 0.3 s, which the lines before it break down).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from medfm.data import SPLITS
from medfm.resolve.defaults import C_GRID
from medfm.probe import StoreArrays
from medfm.resolve.methods.logreg import PATIENCE
from medfm.probe.solvers import cuml_available
from medfm.runtime import cuda_available
from medfm.sampling import SubsetSpec, sample
from medfm.store.features import FeatureStore, find_stores
from medfm.synthetic import write_feature_store

FRACTIONS = (0.01, 0.1, 1.0)
SEEDS = (0, 1, 2)
PATH_ROWS = {"train": 89_996, "val": 10_004, "test": 7_180}  # PathMNIST split sizes
PATH_DIM, PATH_CLASSES = 1280, 9  # EfficientNet-Lite0 / -B0 pooled width, PathMNIST classes


def synthetic_pathmnist(workdir: Path) -> FeatureStore:
    """A PathMNIST-shaped store: non-negative (post-ReLU-like) features from 9 overlapping
    clusters in a 32-d latent space, projected to 1280-d with noise."""
    found = find_stores(workdir, dataset="pathmnist")
    if found:
        return found[0]
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(PATH_CLASSES, 32)) * 0.7
    projection = rng.normal(size=(32, PATH_DIM)).astype(np.float32) / 4
    labels = {s: rng.integers(0, PATH_CLASSES, (n, 1)).astype(np.uint8)
              for s, n in PATH_ROWS.items()}
    features = {}
    for split in SPLITS:
        latent = centers[labels[split][:, 0]] + rng.normal(size=(len(labels[split]), 32))
        noise = rng.normal(size=(len(latent), PATH_DIM)).astype(np.float32)
        features[split] = np.maximum(latent.astype(np.float32) @ projection + noise, 0)
    return FeatureStore(write_feature_store(workdir, "pathmnist", features, labels,
                                            backbone="synthetic_lite0.bench"))


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


RUN = """
import json, sys, time
t = time.perf_counter()
from medfm.probe import probe
import medfm.metrics
import medfm.resolve.methods.logreg as logreg  # where the key settings are declared
logreg.PATIENCE = {patience!r}  # None: the exhaustive walk (a different params, so its own key)
spent = dict(metrics_s=0.0)
evaluate = medfm.metrics.evaluate
def timed_evaluate(*args, **kwargs):  # the test metrics' share of the probe, timed in place
    started = time.perf_counter()
    try:
        return evaluate(*args, **kwargs)
    finally:
        spent["metrics_s"] += time.perf_counter() - started
import medfm.probe.run
medfm.probe.run.evaluate = timed_evaluate
report = probe(store={store!r}, fractions={fractions!r}, seeds={seeds!r}, solver={solver!r},
               device={device!r}, workdir={workdir!r}, force=True, progress=False)
rows = [dict(fraction=r.key.fraction, seed=r.key.seed, C=r.chosen_C, acc=r.acc, auc=r.auc,
             solver=r.solver, walked=len(r.extra["path"])) for r in report.computed]
print(json.dumps(dict(probe_s=report.wall_s, process_s=time.perf_counter() - t, rows=rows,
                      **spent)))
"""


def run_solver(store: FeatureStore, solver: str, workdir: Path, *, exhaustive: bool,
               device: str | None = None) -> dict:
    """A full probe with `solver` in a fresh process (its imports count, as for a user), the
    walk stopped as `medfm probe` stops it or (exhaustive) over the whole grid."""
    patience = None if exhaustive else PATIENCE
    code = RUN.format(store=str(store.path), fractions=FRACTIONS, seeds=SEEDS, solver=solver,
                      patience=patience, device=device,
                      workdir=str(workdir / f"registry-{solver}-{patience}-{device}"))
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def _choices(result: dict) -> dict:
    """(fraction, seed) -> (chosen C, test ACC, test AUC)."""
    return {(r["fraction"], r["seed"]): (r["C"], r["acc"], r["auc"]) for r in result["rows"]}


def compare(name: str, store: FeatureStore, workdir: Path, device: str | None
            ) -> tuple[str, dict]:
    """Today's exhaustive torch walk vs `medfm probe` by default, each in a fresh process; prints
    the comparison and returns its `probe_compare` line and the new path's figures."""
    old = run_solver(store, "torch", workdir, exhaustive=True, device=device)
    new = run_solver(store, "auto", workdir, exhaustive=False, device=device)
    reference, chosen = _choices(old), _choices(new)
    grid = list(C_GRID)
    near = sum(abs(grid.index(chosen[k][0]) - grid.index(reference[k][0])) <= 1
               for k in reference)
    d_acc = max(abs(chosen[k][1] - reference[k][1]) for k in reference) * 100
    d_auc = max(abs(chosen[k][2] - reference[k][2]) for k in reference) * 100
    used = "+".join(sorted({r["solver"] for r in new["rows"]}))
    for label, result in (("old (torch, exhaustive walk)", old), (f"new ({used})", new)):
        print(f"{name:40s} {label:30s} {result['wall_s']:6.1f} s process, "
              f"{result['probe_s']:.2f} s in probe, of which test metrics "
              f"{result['metrics_s']:.2f} s; fits and the rest "
              f"{result['probe_s'] - result['metrics_s']:.2f} s", flush=True)
    for k in sorted(reference):
        print(f"{name:40s} fraction {k[0]:<5g} seed {k[1]}: C {reference[k][0]:g} -> "
              f"{chosen[k][0]:g}, ACC {100 * reference[k][1]:.2f} -> {100 * chosen[k][1]:.2f}, "
              f"AUC {100 * reference[k][2]:.2f} -> {100 * chosen[k][2]:.2f}")
    tag = name.split(")")[0].strip("(")
    return (f"probe_compare {tag} new_s {new['wall_s']:.2f} old_s {old['wall_s']:.2f} "
            f"same_or_adjacent_C {near}/{len(reference)} max_dacc_pp {d_acc:.2f} "
            f"max_dauc_pp {d_auc:.2f}"), new


def _seed_paper_widths() -> dict[str, int]:
    """Feature width of each seed-paper backbone (timm models built on the meta device: no
    weights, no memory), what its stores hold."""
    import timm
    import torch

    from medfm.backbones.names import resolve_backbone
    from medfm.resolve.presets import SEED_PAPER_BACKBONES

    widths = {}
    for alias in SEED_PAPER_BACKBONES:
        with torch.device("meta"):
            model = timm.create_model(resolve_backbone(alias).arch, pretrained=False,
                                      num_classes=0)
        widths[alias] = getattr(model, "head_hidden_size", None) or model.num_features
    return widths


def project_seed_paper(result: dict, store: FeatureStore) -> str:
    """The seed-paper grid's probe stage (its 816 stores: 12 datasets x 4 sizes x 17 backbones,
    fractions 0.01/0.1/1.0 x 3 seeds each) projected from one measured store: the fits scale
    with train rows x width x logits, the test metrics with test rows x score columns, per
    store; the process start is paid once."""
    from medfm.data import DATASETS, Task
    from medfm.resolve.presets import MEDMNIST_SIZES

    fit_s = result["probe_s"] - result["metrics_s"]
    measured_fit = store.rows["train"] * store.dim * PATH_CLASSES
    measured_metrics = store.rows["test"] * PATH_CLASSES
    total = result["wall_s"] - result["probe_s"]
    widths = _seed_paper_widths()
    for info in DATASETS.values():
        logits = 1 if info.task is Task.BINARY else info.n_classes
        for width in widths.values():
            fit = info.n_samples["train"] * width * logits / measured_fit * fit_s
            metrics = (info.n_samples["test"] * max(2, info.n_classes) / measured_metrics
                       * result["metrics_s"])
            total += (fit + metrics) * len(MEDMNIST_SIZES)
    stores = len(DATASETS) * len(MEDMNIST_SIZES) * len(widths)
    return (f"projection: the seed-paper grid's probe stage, {stores} stores x 9 runs, "
            f"{total / 60:.1f} min on this device (fits {fit_s:.2f} s and test metrics "
            f"{result['metrics_s']:.2f} s per PathMNIST-sized store, scaled by each dataset's "
            f"split sizes and each backbone's width)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medfm-bench"))
    parser.add_argument("--solvers", default=None,
                        help="comma list (default: auto, then every available solver)")
    parser.add_argument("--store", help="probe this store only (.h5)")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--compare", action="store_true",
                        help="today's exhaustive torch walk vs the default probe (issue 25)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if visible)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    solvers = (args.solvers.split(",") if args.solvers else
               ["auto", "sklearn", "torch"] + (["cuml"] if cuml_available() else []))
    workloads = {"(b) synthetic PathMNIST 90k x 1280 x 9": synthetic_pathmnist}
    if not args.skip_real:
        workloads = {"(a) PneumoniaMNIST Lite0 (real)": real_pneumonia, **workloads}
    if args.store:
        workloads = {Path(args.store).name.split("__")[0]: lambda _: FeatureStore(args.store)}
    print(f"grid {len(C_GRID)} C values, stopped once the loss rose {PATIENCE}x; fractions "
          f"{FRACTIONS} x seeds {SEEDS}; cuda={cuda_available()}; each run in a fresh process")
    if args.compare:
        lines = []
        for name, build in workloads.items():
            store = build(workdir)
            line, new = compare(name, store, workdir, args.device)
            lines.append(line)
        if "(b)" in name:  # the PathMNIST-shaped store scales to the whole grid
            print(project_seed_paper(new, store))
        print("\n".join(lines))
        return
    for name, build in workloads.items():
        store = build(workdir)
        for solver in solvers:
            stopped = run_solver(store, solver, workdir, exhaustive=False)
            full = run_solver(store, solver, workdir, exhaustive=True)
            chosen, reference = _choices(stopped), _choices(full)
            same_c = sum(chosen[k][0] == reference[k][0] for k in reference)
            d_acc = max(abs(chosen[k][1] - reference[k][1]) for k in reference) * 100
            d_auc = max(abs(chosen[k][2] - reference[k][2]) for k in reference) * 100
            used = sorted({r["solver"] for r in stopped["rows"]})
            walked = sum(r["walked"] for r in stopped["rows"])
            walked_full = sum(r["walked"] for r in full["rows"])
            one = chosen[(1.0, SEEDS[0])]
            print(f"{name:40s} {solver:8s} stopped {stopped['wall_s']:6.1f} s process "
                  f"({stopped['probe_s']:.1f} s in probe, {walked} fits) vs exhaustive "
                  f"{full['wall_s']:6.1f} s ({full['probe_s']:.1f} s, {walked_full} fits); "
                  f"fitted by {'+'.join(used)}; fraction 1.0: C {one[0]:g} ACC "
                  f"{100 * one[1]:.2f} AUC {100 * one[2]:.2f}; same C {same_c}/{len(reference)},"
                  f" max |dACC| {d_acc:.2f} pp, max |dAUC| {d_auc:.2f} pp", flush=True)
        if not args.skip_naive:
            print(f"{name:40s} {'naive':8s} {naive_seconds(store):6.1f} s (sklearn, fresh fit "
                  f"per C, seed 0 x {len(SEEDS)})")


if __name__ == "__main__":
    main()
