"""How `medfm report` scales: generation time and report.html's size for a large registry, and
how fast the page answers in headless Chromium.

    python benchmarks/report_bench.py                      # 20,160 rows
    python benchmarks/report_bench.py --rows 5000 --workdir /tmp/rb

The registry is filled with synthetic rows through the real Registry (the seed paper's 14-odd
backbones x {logreg, finetune} on the 12 MedMNIST flags at 4 sizes, 5 fractions, 3 seeds: 720
rows per variant, whole variants until --rows is reached; metrics drawn at random, no scores).
It then times `report()` (tables, PNG plots, guideline, report.html), with the seconds spent
in the matplotlib PNGs and in writing report.html, and prints report.html's size. Where
Playwright and a Chromium are installed (medfm.report.browser), it opens the page and times the
first render (data parsed, every table and plot drawn) and one filter change (a dataset
unticked: every table and plot redrawn).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np

from medfm.data import DATASETS
from medfm.report import build, report
from medfm.store.registry import Registry, ResultKey, ResultRow, canonical_json

BACKBONES = (
    "vgg16.tv_in1k", "resnet18.a1_in1k", "densenet121.ra_in1k", "efficientnet_b4.ra2_in1k",
    "inception_v3.tv_in1k", "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_base_patch16_clip_224.laion2b_ft_in12k_in1k",
    "vit_base_patch16_clip_224.openai_ft_in12k_in1k", "eva02_base_patch14_224.mim_in22k",
    "vit_base_patch16_224.dino", "vit_small_patch16_224.dino",
    "vit_small_patch14_dinov2.lvd142m", "vit_base_patch14_dinov2.lvd142m",
    "samvit_base_patch16.sa1b",
)
METHODS = ("logreg", "finetune")
SIZES = (28, 64, 128, 224)
FRACTIONS = (0.01, 0.05, 0.1, 0.3, 1.0)
SEEDS = (0, 1, 2)


def fill(registry: Registry, rows: int) -> int:
    """Add up to `rows` synthetic rows, whole variants first; returns how many were added."""
    rng = np.random.default_rng(0)
    added = 0
    for backbone, method in itertools.product(BACKBONES, METHODS):
        skill = rng.uniform(0.6, 0.85)
        for dataset, size, fraction, seed in itertools.product(DATASETS, SIZES, FRACTIONS, SEEDS):
            if added >= rows:
                return added
            acc = float(np.clip(skill + 0.03 * np.log10(fraction) + rng.normal(0, 0.01), 0, 1))
            auc = min(1.0, acc + 0.08)
            probe = method == "logreg"
            key = ResultKey(
                dataset=dataset, size=size, data_digest="d" * 32, backbone=backbone,
                weights="pretrained", resize_policy="bilinear", input_size=224,
                normalize="backbone", feature_kind="prelogits" if probe else "", method=method,
                selection="val", select_metric="loss" if probe else "acc", fraction=fraction,
                seed=seed, params=canonical_json({"C_grid": [0.1, 1.0]} if probe
                                                 else {"name": "medfm", "epochs": 30}),
                store_fingerprint="f" * 16 if probe else "")
            registry.add(ResultRow(
                key=key, n_train=100, subset_digest="0" * 16, acc=acc, auc=auc,
                balanced_acc=acc, acc_ci_low=acc - 0.02, acc_ci_high=acc + 0.02,
                auc_ci_low=auc - 0.02, auc_ci_high=auc + 0.02, ece=0.05, wall_s=1.0))
            added += 1
    return added


def browser_timings(page_path: Path) -> tuple[float, float] | None:
    """(seconds to the first full render, seconds for one filter change), or None without a
    browser."""
    from medfm.errors import MedfmError
    from medfm.report.browser import open_page

    try:
        with open_page(page_path) as (page, _):
            first = page.evaluate("performance.now()") / 1000
            change = page.evaluate("""() => new Promise((done) => {
                const start = performance.now();
                const box = document.querySelector('fieldset[data-field="dataset"] input');
                box.click();
                requestAnimationFrame(() => requestAnimationFrame(
                    () => done((performance.now() - start) / 1000)));
            })""")
            return first, change
    except MedfmError as exc:
        print(f"browser timings skipped: {exc}")
        return None


def timed(owner, name: str, spent: dict[str, float]) -> None:
    """Wrap `owner.name` so that the seconds spent in it add up in spent[name]."""
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_160)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="report-bench-"))
    registry = Registry.in_workdir(workdir)
    if len(registry) < args.rows:
        start = time.perf_counter()
        fill(registry, args.rows)
        print(f"filled {len(registry)} rows in {time.perf_counter() - start:.1f} s")
    spent: dict[str, float] = {}
    for name in ("fraction_curves", "size_curves", "probe_vs_finetune"):
        timed(build.plotting, name, spent)
    timed(build, "write_html", spent)
    start = time.perf_counter()
    files = report(workdir=workdir)
    elapsed = time.perf_counter() - start
    size = files.html.stat().st_size / 1e6
    png = sum(v for k, v in spent.items() if k != "write_html")
    print(f"report of {files.n_runs} rows: {elapsed:.1f} s ({png:.1f} s matplotlib PNGs, "
          f"{spent['write_html']:.1f} s report.html), report.html {size:.1f} MB, "
          f"{len(files.plots)} PNG plots")
    timings = browser_timings(files.html)
    if timings:
        print(f"Chromium: first render {timings[0]:.2f} s, one filter change {timings[1]:.2f} s")


if __name__ == "__main__":
    main()
