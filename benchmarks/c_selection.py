"""Which rule should choose the probe's C? Warm vs cold fits, solver vs solver, test ACC/AUC.

    python benchmarks/c_selection.py --stores /tmp/cs/stores/breastmnist_28__*.h5 \\
        /tmp/cs/stores/breastmnist_64__*.h5 /tmp/pb/stores/pneumoniamnist_28__*.h5
    python benchmarks/c_selection.py --stores S.h5 --fractions 0.1 --seeds 0 --json out.json

For every store x fraction x seed it draws the training subset (medfm.sampling), standardizes it
(as the probe does) and walks `C_GRID` six ways: warm-started sklearn, warm-started torch, and a
fresh scikit-learn fit per C ("cold"), each at the default tolerance (1e-4) and at 1e-6. At every
C it records the val ACC, AUC and log-loss (medfm.metrics) and the test ACC and AUC. Each rule
then picks a C from each walk:

- `acc`: the first C with the best val ACC (medfm's rule before issue 12);
- `acc@1e-6`: the same rule on the walks fitted to tolerance 1e-6;
- `acc>loss`, `acc@1e-6>loss`: the best val ACC, ties broken by the lowest val log-loss (at
  tolerance 1e-4 and 1e-6);
- `acc>auc>loss`: the best val ACC, ties broken by val AUC, then by lower val log-loss;
- `loss`: the lowest val log-loss;
- `loss>m`: walking from strong to weak regularization, a C replaces the best so far only if it
  lowers the val log-loss by more than a share m of the best (LOSS_MARGIN; `--margins` adds
  others), over the whole grid;
- `loss>m/stop`: the same, the walk stopped once the loss has risen PATIENCE C values in a row
  (what `medfm probe` computes: medfm.probe.methods.logreg); it agrees with `loss>m` unless a C
  after the stop would have replaced the best.

Printed per rule: how often the three walks (sklearn warm, torch warm, sklearn cold) choose the
same C, and the mean (and spread over seeds) of the test ACC/AUC at the C the sklearn warm walk
chose. Fraction 1.0 draws the whole split, so its seeds are one run (fitted once).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from medfm.data import Task, get_dataset
from medfm.metrics import acc, auc, nll
from medfm.resolve.defaults import C_GRID
from medfm.probe.methods.logreg import LOSS_MARGIN, PATIENCE, _proba, _standardize
from medfm.probe.solvers import DEFAULT_MAX_ITER, DEFAULT_TOL, make_solver
from medfm.probe.targets import encode_like, encode_targets
from medfm.sampling import SubsetSpec, sample
from medfm.store.features import FeatureStore

FRACTIONS = (0.01, 0.1, 0.3, 1.0)
SEEDS = (0, 1, 2, 3, 4)
TIGHT_TOL = 1e-6  # the tighter solver tolerance compared with DEFAULT_TOL
WALKS = ("sklearn", "torch", "cold")  # warm sklearn, warm torch, a fresh sklearn fit per C
KIND = {Task.BINARY: "binary", Task.MULTI_CLASS: "multinomial", Task.ORDINAL: "multinomial"}


def walk(how: str, tol: float, Z, y, Z_val, y_val, Z_test, y_test, task: Task) -> list[dict]:
    """Per C of C_GRID: val acc/auc/loss and test acc/auc of one walk (how: WALKS)."""
    kind, n_classes = KIND[task], len(np.unique(y))
    solver = None if how == "cold" else make_solver(
        how, Z, y, kind, max_iter=DEFAULT_MAX_ITER, tol=tol, n_classes=n_classes)
    fit_task = Task.BINARY if task is Task.BINARY else Task.MULTI_CLASS
    path = []
    for C in C_GRID:
        fit = (solver or make_solver("sklearn", Z, y, kind, max_iter=DEFAULT_MAX_ITER, tol=tol,
                                     n_classes=n_classes)).fit(C)
        p_val = _proba(Z_val, fit.coef, fit.intercept, fit_task)
        p_test = _proba(Z_test, fit.coef, fit.intercept, fit_task)
        path.append({"C": C, "val_acc": acc(y_val, p_val, fit_task),
                     "val_auc": auc(y_val, p_val, fit_task),
                     "val_loss": nll(y_val, p_val, fit_task),
                     "test_acc": acc(y_test, p_test, fit_task),
                     "test_auc": auc(y_test, p_test, fit_task), "converged": fit.converged})
    return path


def sequential(loss: np.ndarray, margin: float, patience: int | None) -> int:
    """The index the probe's loss rule chooses on one walk's val log-losses."""
    best = rising = 0
    for i in range(1, len(loss)):
        rising = rising + 1 if loss[i] > loss[i - 1] else 0
        if loss[i] < loss[best] * (1.0 - margin):
            best = i
        elif patience is not None and rising >= patience:
            break
    return best


def choose(path: list[dict], rule: str) -> int:
    """The index of the C that `rule` chooses on one walk (module docstring)."""
    val_acc = np.array([p["val_acc"] for p in path])
    val_auc = np.array([p["val_auc"] for p in path])
    val_loss = np.array([p["val_loss"] for p in path])
    if rule in ("acc", "acc@1e-6"):
        return int(np.argmax(val_acc))
    if rule == "acc>auc>loss":
        return int(np.lexsort((val_loss, -val_auc, -val_acc))[0])
    if rule in ("acc>loss", "acc@1e-6>loss"):
        return int(np.lexsort((val_loss, -val_acc))[0])
    if rule in ("loss", "loss@1e-6"):
        return int(np.argmin(val_loss))
    if rule.startswith("loss~"):  # the weakest regularization within a margin of the best
        margin = float(rule.removeprefix("loss~"))
        return int(np.flatnonzero(val_loss <= val_loss.min() * (1.0 + margin))[-1])
    if rule.startswith("loss>"):
        margin, _, stop = rule.removeprefix("loss>").partition("/")
        return sequential(val_loss, float(margin), PATIENCE if stop else None)
    raise ValueError(rule)


def rules(margins: list[float]) -> dict[str, float]:
    """Rule name -> the solver tolerance of the walks it reads."""
    named = {"acc": DEFAULT_TOL, "acc@1e-6": TIGHT_TOL, "acc>auc>loss": DEFAULT_TOL,
             "acc>loss": DEFAULT_TOL, "acc@1e-6>loss": TIGHT_TOL,
             "loss": DEFAULT_TOL, "loss@1e-6": TIGHT_TOL}
    for margin in margins:
        named[f"loss>{margin:g}"] = named[f"loss>{margin:g}/stop"] = DEFAULT_TOL
        named[f"loss~{margin:g}"] = DEFAULT_TOL
    return named


def study(store_path: Path, fractions, seeds, margins) -> list[dict]:
    """Every run of one store: its walks and, per rule and walk, the chosen C index."""
    store = FeatureStore(store_path)
    info = get_dataset(store.request["dataset"])
    X = store.features("train")
    labels = store.labels("train")
    targets = encode_targets(labels[:, 0])
    runs = []
    for fraction in fractions:
        for seed in (seeds if fraction < 1.0 else seeds[:1]):
            rows = sample(labels, info.task, SubsetSpec(fraction=fraction, seed=seed)).indices
            mean, scale, Z = _standardize(X[rows])
            standardized = {s: (store.features(s) - mean) / scale for s in ("val", "test")}
            y = targets.encoded[rows]
            y_val = encode_like(store.labels("val")[:, 0], targets)
            y_test = encode_like(store.labels("test")[:, 0], targets)
            started = time.perf_counter()
            walks = {(how, tol): walk(how, tol, Z, y, standardized["val"], y_val,
                                      standardized["test"], y_test, info.task)
                     for how in WALKS for tol in (DEFAULT_TOL, TIGHT_TOL)}
            chosen = {rule: {how: choose(walks[(how, tol)], rule) for how in WALKS}
                      for rule, tol in rules(margins).items()}
            runs.append({"store": f"{info.flag}_{store.request['size']}", "fraction": fraction,
                         "seed": seed, "n_train": len(rows), "chosen": chosen,
                         "walks": {f"{how}@{tol:g}": path for (how, tol), path in walks.items()},
                         "seconds": time.perf_counter() - started})
            print(f"{runs[-1]['store']:16s} f={fraction:<5g} seed {seed} n={len(rows):5d} "
                  + "  ".join(f"{rule}: " + "/".join(f"{C_GRID[i]:.0e}" for i in c.values())
                              for rule, c in chosen.items()), flush=True)
    return runs


def summarize(runs: list[dict], margins: list[float]) -> str:
    """Markdown: per rule, agreement of the walks and test metrics at the sklearn-warm choice."""
    RULES = rules(margins)  # noqa: N806
    for r in runs:  # rules added after the walks were saved
        r["chosen"] = {rule: {how: choose(r["walks"][f"{how}@{tol:g}"], rule) for how in WALKS}
                       for rule, tol in RULES.items()}
    lines = ["| rule | all 3 walks agree | sklearn = torch (warm) | warm = cold (sklearn) | "
             "test ACC | test AUC |", "|---|---|---|---|---|---|"]
    for rule, tol in RULES.items():
        agree = sum(len(set(r["chosen"][rule].values())) == 1 for r in runs)
        solvers = sum(r["chosen"][rule]["sklearn"] == r["chosen"][rule]["torch"] for r in runs)
        cold = sum(r["chosen"][rule]["sklearn"] == r["chosen"][rule]["cold"] for r in runs)
        picked = [r["walks"][f"sklearn@{tol:g}"][r["chosen"][rule]["sklearn"]] for r in runs]
        lines.append(f"| {rule} | {agree}/{len(runs)} | {solvers}/{len(runs)} | "
                     f"{cold}/{len(runs)} | {100 * np.mean([p['test_acc'] for p in picked]):.2f} |"
                     f" {100 * np.mean([p['test_auc'] for p in picked]):.2f} |")
    lines += ["", "Per store and fraction: mean +- sd over seeds of test ACC / AUC (sklearn warm "
              "walk), and runs where all 3 walks agree.", "",
              "| store | fraction | runs | " + " | ".join(RULES) + " |",
              "|---|---|---|" + "---|" * len(RULES)]
    groups = defaultdict(list)
    for r in runs:
        groups[(r["store"], r["fraction"])].append(r)
    for (store, fraction), group in groups.items():
        cells = []
        for rule, tol in RULES.items():
            picked = [r["walks"][f"sklearn@{tol:g}"][r["chosen"][rule]["sklearn"]] for r in group]
            a = 100 * np.array([p["test_acc"] for p in picked])
            u = 100 * np.array([p["test_auc"] for p in picked])
            agree = sum(len(set(r["chosen"][rule].values())) == 1 for r in group)
            cells.append(f"{a.mean():.1f}+-{a.std():.1f} / {u.mean():.1f}+-{u.std():.1f} "
                         f"({agree}/{len(group)})")
        lines.append(f"| {store} | {fraction:g} | {len(group)} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired over the {len(runs)} runs, each rule minus `loss>{margins[0]:g}` "
              "(sklearn warm walk): mean difference in test ACC / AUC, pp (standard error)", ""]
    base = f"loss>{margins[0]:g}"
    for rule, tol in RULES.items():
        diff = {m: 100 * np.array([
            r["walks"][f"sklearn@{tol:g}"][r["chosen"][rule]["sklearn"]][f"test_{m}"]
            - r["walks"][f"sklearn@{RULES[base]:g}"][r["chosen"][base]["sklearn"]][f"test_{m}"]
            for r in runs]) for m in ("acc", "auc")}
        se = {m: d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0 for m, d in diff.items()}
        lines.append(f"- `{rule}`: ACC {diff['acc'].mean():+.2f} ({se['acc']:.2f}), "
                     f"AUC {diff['auc'].mean():+.2f} ({se['auc']:.2f})")
    for margin in margins:
        full, stop = f"loss>{margin:g}", f"loss>{margin:g}/stop"
        same = sum(r["chosen"][stop][h] == r["chosen"][full][h] for r in runs for h in WALKS)
        lines.append(f"{stop} = {full} (stopped vs whole walk): "
                     f"{same}/{len(runs) * len(WALKS)} walks")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", nargs="+", default=[], help="feature store .h5 files")
    parser.add_argument("--margins", default=f"{LOSS_MARGIN:g}",
                        help="loss margins of the loss>m rules (comma list)")
    parser.add_argument("--from-json", help="summarize walks saved by --json (no fitting)")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--json", help="write every walk here")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    margins = [float(m) for m in args.margins.split(",")]
    runs = json.loads(Path(args.from_json).read_text()) if args.from_json else [
        run for path in args.stores for run in study(Path(path), fractions, seeds, margins)]
    if args.json:
        Path(args.json).write_text(json.dumps(runs))
    print(summarize(runs, margins))


if __name__ == "__main__":
    main()
