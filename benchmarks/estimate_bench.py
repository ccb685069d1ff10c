"""Does a grid's cost estimate hold? A small real grid on this machine, estimated, then run.

    MEDFM_DATA_ROOT=../shared/data/medmnist python benchmarks/estimate_bench.py [--workdir W]

1. Calibration: a grid on BreastMNIST-28 (780 images) runs once with an empty throughput cache
   ($MEDFM_CACHE under the work folder), so every extraction, fine-tune and probe job measures
   its figures (medfm.throughput).
2. Target: another grid, on the other files present (PneumoniaMNIST-28, 5,856 images, and
   BreastMNIST-64, in the shared data folder) with the same backbones and model input size,
   is priced from those figures (`medfm grid --dry-run`'s estimate), then run; the script
   prints, per stage, the estimated and the actual job seconds (`JobOutcome.wall_s`, summed)
   and their ratio (target: within 25%).
Both grids: resnet18 and tf_efficientnet_lite0 (random weights), images resized to INPUT_SIZE px,
logreg (scikit-learn) at fractions 0.1 and 1.0, and fine-tuning (medfm-v1 recipe, EPOCHS epochs),
on the CPU, on the local executor with one worker (jobs one at a time, as the estimate counts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

BACKBONES = ["resnet18", "tf_efficientnet_lite0"]
INPUT_SIZE = 64  # model input side of every job (the figures are per input size)
EPOCHS = 2  # fine-tuning length of every run
CALIBRATION = {"datasets": ["breastmnist"], "sizes": [28], "fractions": [0.1, 1.0]}
TARGET = {"datasets": None, "sizes": [28, 64], "fractions": [0.1]}  # every file present:
#          PneumoniaMNIST-28 and BreastMNIST-64 (BreastMNIST-28 at 0.1 was calibrated: done)
TOLERANCE = 0.25  # |estimated / actual - 1| this bench aims under, per stage


def spec(axes: dict, data_root: str):
    from medfm.grid import spec_from_dict

    return spec_from_dict({
        **axes, "backbones": BACKBONES, "weights": "random", "seeds": [0],
        "methods": ["logreg", "finetune"], "solver": "sklearn", "device": "cpu",
        "resize_policy": "bilinear", "input_size": INPUT_SIZE, "data_root": data_root,
        "finetune": {"recipe": "medfm-v1", "overrides": {"epochs": EPOCHS}},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument("--data-root", default=os.environ.get("MEDFM_DATA_ROOT"))
    parser.add_argument("--jobs", action="store_true", help="also print every job's seconds")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="medfm-estimate-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["MEDFM_CACHE"] = str(work / "cache")  # no figure measured before this run

    from medfm.grid import run_grid
    from medfm.grid.estimate import actual_seconds
    from medfm.grid.executors.local import LocalExecutor

    executor = LocalExecutor(max_workers=1)
    try:
        started = time.perf_counter()
        calibration = run_grid(spec(CALIBRATION, args.data_root), workdir=work / "grid",
                               executor=executor, progress=False)
        print(f"calibration grid: {len(calibration.outcomes)} jobs in "
              f"{time.perf_counter() - started:.0f} s ({len(calibration.failed)} failed)")
        from medfm.throughput import measured_figures

        calibrated = measured_figures()  # what the target is priced from
        target = spec(TARGET, args.data_root)
        planned = run_grid(target, workdir=work / "grid", executor=executor, dry_run=True)
        print("\n".join(planned.estimate.describe()))
        started = time.perf_counter()
        ran = run_grid(target, workdir=work / "grid", executor=executor, progress=False)
        print(f"target grid: {len(ran.outcomes)} jobs in {time.perf_counter() - started:.0f} s "
              f"({len(ran.failed)} failed)")
    finally:
        executor.close()
    if args.jobs:  # each job's actual seconds; a target job's estimate beside it
        from medfm.grid.estimate import price_job

        print(f"\n{'job':<66}{'estimated s':>12}{'actual s':>10}")
        for grid_name, outcomes in (("calibration", calibration.outcomes),
                                    ("target", ran.outcomes)):
            for outcome in outcomes:
                est = (f"{price_job(outcome.job, calibrated)[0]:>12.2f}"
                       if grid_name == "target" else f"{'':>12}")
                print(f"{grid_name + ' ' + outcome.job.label:<66.66}{est}{outcome.wall_s:>10.2f}")
    estimated, actual = planned.estimate.seconds, actual_seconds(ran.outcomes)
    print(f"\n{'stage':<10}{'jobs':>6}{'estimated s':>13}{'actual s':>10}{'est/actual':>12}")
    for stage in (*estimated, "total"):
        est = sum(estimated.values()) if stage == "total" else estimated[stage]
        got = sum(actual.values()) if stage == "total" else actual.get(stage, 0.0)
        jobs = len(ran.outcomes) if stage == "total" else sum(
            o.job.kind == stage for o in ran.outcomes)
        ratio = est / got if got else float("nan")
        mark = "" if abs(ratio - 1) <= TOLERANCE else "  (outside 25%)"
        print(f"{stage:<10}{jobs:>6}{est:>13.1f}{got:>10.1f}{ratio:>12.2f}{mark}")
    print(f"device: {planned.estimate.device}; cores {os.cpu_count()}; "
          f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
