"""Print the per-seed table of docs/reproduction.md for the medmnist-v2 runs in a registry.

    python benchmarks/repro_table.py pneumoniamnist [--workdir medfm-work/repro] [--epochs 20]

One row per seed (test ACC/AUC in % with their bootstrap 95% CIs, the epoch whose checkpoint was
tested, wall time), then mean +- sample std over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics

from medfm.store.registry import Registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--workdir", default="medfm-work/repro")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--epochs", type=int, default=None, help="only runs of this length")
    args = parser.parse_args()
    rows = []
    for row in Registry.in_workdir(args.workdir).query(method="finetune", dataset=args.dataset,
                                                       backbone=args.backbone):
        params = json.loads(row.key.params)
        if params["name"] != "medmnist-v2" or (args.epochs and params["epochs"] != args.epochs):
            continue
        rows.append((row.key.seed, params["epochs"], row))
    if not rows:
        raise SystemExit(f"no medmnist-v2 {args.backbone} runs on {args.dataset} in {args.workdir}")
    print("| seed | epochs | ACC | ACC 95% CI | AUC | AUC 95% CI | best epoch | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, epochs, r in sorted(rows, key=lambda t: (t[1], t[0])):
        per_epoch = r.extra["steps"] / epochs
        best_epoch = r.extra["curves"][r.extra["best_round"] - 1]["step"] / per_epoch
        print(f"| {seed} | {epochs} | {100 * r.acc:.2f} | {100 * r.acc_ci_low:.1f}-"
              f"{100 * r.acc_ci_high:.1f} | {100 * r.auc:.2f} | {100 * r.auc_ci_low:.1f}-"
              f"{100 * r.auc_ci_high:.1f} | {best_epoch:.0f} | {r.wall_s:.0f} s |")
    accs = [100 * r.acc for *_, r in rows]
    aucs = [100 * r.auc for *_, r in rows]
    print(f"| **mean +- std** ({len(rows)} runs) | | **{_mean_sd(accs)}** | | "
          f"**{_mean_sd(aucs)}** | | | |")


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {sd:.2f}"


if __name__ == "__main__":
    main()
