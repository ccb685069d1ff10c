"""How grid planning scales: plan a grid whose every job is done, at N = 100 and N = 800 stores.

    python benchmarks/plan_bench.py                    # builds what is missing, then times
    python benchmarks/plan_bench.py --workdir /tmp/pb  # keep the stores between runs

For each N, the script builds N finished feature stores and their registry rows through
medfm's own API (`extract` of tiny synthetic MedMNIST files through timm's small `test_*`
models and a few small real architectures with random weights, then `probe` at 2 fractions x
3 seeds: 6 rows per store), in a work directory of its own. It then plans the grid covering all
of them in a fresh process (everything done: nothing to run) and prints the planning time. The
last line is `plan_scaling <t800/t100>` (linear growth is 8). Building is slow the first time
(minutes at N = 800); the stores are kept in --workdir, so later runs only plan.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medfm.synthetic import write_synthetic_npz

SIZES = (28, 64, 128, 224)
DATASETS = ("breastmnist", "pneumoniamnist", "bloodmnist", "dermamnist", "retinamnist",
            "organamnist", "organcmnist", "organsmnist", "octmnist", "tissuemnist")
BACKBONES = (  # 20 tiny networks, random weights
    "test_resnet", "test_efficientnet", "test_convnext", "test_vit", "test_byobnet",
    "test_convnext2", "test_convnext3", "test_efficientnet_evos", "test_efficientnet_gn",
    "test_efficientnet_ln", "test_nfnet", "test_vit2", "test_vit3", "test_vit4",
    "test_vit_relpos", "test_mambaout", "test_coatnet", "test_maxvit", "resnet10t",
    "lcnet_050",
)
GRIDS = {100: (DATASETS[:5], BACKBONES[:5]), 800: (DATASETS, BACKBONES)}  # x 4 sizes
ROWS = (24, 8, 8)  # synthetic train / val / test images per dataset file (>= 1 per class)
FRACTIONS, SEEDS = (0.5, 1.0), (0, 1, 2)
PLAN = """
import sys, time
from medfm.grid import plan_grid, spec_from_dict
spec = spec_from_dict({spec!r})
t = time.perf_counter()
plan = plan_grid(spec, workdir={workdir!r})
print(time.perf_counter() - t, plan.total["extract"], plan.done["extract"], plan.done["probe"],
      len(plan.jobs))
"""


def spec(datasets, backbones, data_root: Path) -> dict:
    return {"datasets": list(datasets), "sizes": list(SIZES), "backbones": list(backbones),
            "weights": "random", "fractions": list(FRACTIONS), "seeds": list(SEEDS),
            "methods": ["logreg"], "solver": "sklearn", "data_root": str(data_root),
            "device": "cpu"}


def build(n: int, workdir: Path, data_root: Path) -> None:
    """Extract and probe every store of grid `n` that is not done yet (resumable)."""
    from medfm.extract import extract
    from medfm.probe import probe

    datasets, backbones = GRIDS[n]
    started, todo = time.perf_counter(), len(datasets) * len(SIZES) * len(backbones)
    done = 0
    for dataset in datasets:
        for size in SIZES:
            for backbone in backbones:
                result = extract(dataset=dataset, size=size, backbone=backbone,
                                 weights="random", device="cpu", workdir=workdir,
                                 data_root=data_root, progress=False)
                probe(store=result.path, fractions=FRACTIONS, seeds=SEEDS, solver="sklearn",
                      workdir=workdir, progress=False)
                done += 1
                if done % 50 == 0:
                    print(f"  N={n}: {done}/{todo} stores "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)


def plan_seconds(n: int, workdir: Path, data_root: Path) -> float:
    """Planning time of grid `n` in a fresh process (imports not counted), best of 3."""
    datasets, backbones = GRIDS[n]
    code = PLAN.format(spec=spec(datasets, backbones, data_root), workdir=str(workdir))
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout.split()
        seconds, stores, built, probes_done, to_run = float(out[0]), *map(int, out[1:])
        assert stores == built == n and to_run == 0, out  # everything done
        assert probes_done == n * len(FRACTIONS) * len(SEEDS)
        times.append(seconds)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medfm-plan"))
    args = parser.parse_args()
    root = Path(args.workdir)
    data_root = root / "data"
    for dataset in DATASETS:
        for size in SIZES:
            if not (data_root / (f"{dataset}.npz" if size == 28 else
                                 f"{dataset}_{size}.npz")).exists():
                write_synthetic_npz(data_root, dataset, size=size, n=ROWS)
    seconds = {}
    for n in GRIDS:
        build(n, root / f"n{n}", data_root)
        seconds[n] = plan_seconds(n, root / f"n{n}", data_root)
        print(f"plan N={n} stores ({n * len(FRACTIONS) * len(SEEDS)} probe rows), everything "
              f"done: {seconds[n]:.2f} s")
    print(f"plan_scaling {seconds[800] / seconds[100]:.2f}")


if __name__ == "__main__":
    main()
