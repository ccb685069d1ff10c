"""Report: tables read back by content, plots by size and ink, guideline verdicts, report.html.

Run: .venv/bin/python -m pytest tests/test_report.py -q

The registry is filled with runs of known metrics (a real SQLite registry; the report reads only
the registry), so every number in the tables can be predicted.
"""

from __future__ import annotations

import itertools
import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from medfm.errors import RegistryError
from medfm.report import report
from medfm.store.registry import Registry, ResultKey, ResultRow, canonical_json

FRACTIONS = (0.01, 0.1, 1.0)  # one per guideline bucket
SEEDS = (0, 1, 2)
SEED_OFFSET = 0.01  # acc = base + step * fraction index + (seed - 1) * SEED_OFFSET -> std 1.0 pp
FRACTION_STEP = 0.02
CI_HALF_WIDTH = 0.02
AUC_LIFT = 0.1  # auc = acc + AUC_LIFT
# (backbone, method, size) -> base ACC at the smallest fraction
BASES = {
    ("resnet_a", "logreg", 28): 0.80,
    ("vit_b", "logreg", 28): 0.70,
    ("resnet_a", "finetune", 28): 0.795,  # 0.5 pp behind the probe: a tie within seed noise
    ("resnet_a", "logreg", 64): 0.85,
    ("vit_b", "logreg", 64): 0.72,  # 13 pp behind: a clear win
}
DATASETS = {"breastmnist": 0.0, "pneumoniamnist": 0.04}  # dataset -> ACC shift
MIN_PNG_BYTES = 5_000
MIN_INK = 0.01  # share of pixels that are not background


def expected_acc(backbone, method, size, dataset, fraction, seed) -> float:
    base = BASES[(backbone, method, size)] + DATASETS[dataset]
    return base + FRACTION_STEP * FRACTIONS.index(fraction) + (seed - 1) * SEED_OFFSET


def add_run(registry: Registry, *, backbone, method, size, dataset, fraction, seed,
            resize_policy="bilinear", acc=None) -> None:
    acc = expected_acc(backbone, method, size, dataset, fraction, seed) if acc is None else acc
    auc = acc + AUC_LIFT
    probe = method != "finetune"
    key = ResultKey(
        dataset=dataset, size=size, data_digest="d" * 32, backbone=backbone,
        weights="pretrained", resize_policy=resize_policy, input_size=224, normalize="backbone",
        feature_kind="prelogits" if probe else "", method=method, selection="val",
        select_metric="acc", fraction=fraction, seed=seed,
        params=canonical_json({"C_grid": [0.1, 1.0]} if probe else {"recipe": "tiny"}),
        store_fingerprint="f" * 16 if probe else "",
    )
    registry.add(ResultRow(
        key=key, n_train=100, subset_digest="0" * 16, acc=acc, auc=auc, balanced_acc=acc,
        acc_ci_low=acc - CI_HALF_WIDTH, acc_ci_high=acc + CI_HALF_WIDTH,
        auc_ci_low=auc - CI_HALF_WIDTH, auc_ci_high=auc + CI_HALF_WIDTH, wall_s=1.0,
    ))


@pytest.fixture
def filled(tmp_path) -> Registry:
    registry = Registry.in_workdir(tmp_path / "work")
    for (backbone, method, size), dataset, fraction, seed in itertools.product(
        BASES, DATASETS, FRACTIONS, SEEDS
    ):
        add_run(registry, backbone=backbone, method=method, size=size, dataset=dataset,
                fraction=fraction, seed=seed)
    return registry


def ink(path) -> float:
    """Share of pixels that differ from the figure's background (the top-left pixel)."""
    pixels = matplotlib.image.imread(path)[..., :3]
    return float((np.abs(pixels - pixels[0, 0]).sum(axis=-1) > 0.05).mean())


def test_empty_registry_says_to_run_probe_first(tmp_path):
    with pytest.raises(RegistryError, match="run `medfm probe` or `medfm finetune`"):
        report(workdir=tmp_path / "work")


def test_filters_that_match_nothing_are_an_error(filled, tmp_path):
    with pytest.raises(RegistryError, match="dermamnist"):
        report(workdir=tmp_path / "work", dataset="dermamnist")


def test_tables_hold_seed_mean_and_std_with_best_in_bold(filled, tmp_path):
    files = report(workdir=tmp_path / "work")
    assert files.out == tmp_path / "work" / "report"
    assert files.n_runs == len(BASES) * len(DATASETS) * len(FRACTIONS) * len(SEEDS)
    md = (files.out / "tables" / "per_dataset_acc.md").read_text()
    # breastmnist @28, 1%: resnet_a logreg 80.0 ± 1.0 is the best of three -> bold
    row = next(line for line in md.splitlines() if line.startswith("| breastmnist | 28 | 1% |"))
    assert "**80.0 ± 1.0**" in row
    assert "70.0 ± 1.0" in row and "79.5 ± 1.0" in row
    assert row.count("**") == 2
    # at 64 px nobody fine-tuned: that cell is a dash
    row64 = next(line for line in md.splitlines() if line.startswith("| breastmnist | 64 | 1% |"))
    assert "—" in row64
    tex = (files.out / "tables" / "per_dataset_auc.tex").read_text()
    assert r"\textbf{90.0 $\pm$ 1.0}" in tex and r"\begin{tabular}" in tex
    assert r"resnet\_a $\cdot$ logreg" in tex

    summary = pd.read_csv(files.out / "tables" / "summary.csv")
    assert len(summary) == len(BASES) * len(DATASETS) * len(FRACTIONS)
    for r in summary.itertuples():
        seeds = [expected_acc(r.backbone, r.method, r.size, r.dataset, r.fraction, s)
                 for s in SEEDS]
        assert r.acc_mean == pytest.approx(np.mean(seeds))
        assert r.acc_std == pytest.approx(np.std(seeds, ddof=1))
        assert r.auc_mean == pytest.approx(np.mean(seeds) + AUC_LIFT)
        assert r.acc_ci_low == pytest.approx(np.mean(seeds) - CI_HALF_WIDTH)
        assert r.n_seeds == len(SEEDS)


def test_mean_over_datasets_averages_only_complete_variants(filled, tmp_path):
    # a third dataset with only vit_b: resnet_a no longer covers every dataset at 28 px / 100%
    registry = filled
    for seed in SEEDS:
        add_run(registry, backbone="vit_b", method="logreg", size=28, dataset="dermamnist",
                fraction=1.0, seed=seed, acc=0.5)
    DATASETS["dermamnist"] = 0.0
    try:
        files = report(workdir=registry.path.parent)
    finally:
        del DATASETS["dermamnist"]
    means = pd.read_csv(files.out / "tables" / "mean_over_datasets.csv")
    cell = means[(means["size"] == 28) & (means["regime"] == "100%")]
    assert list(cell["variant"]) == ["vit_b · logreg"]
    assert cell["acc_mean"].iloc[0] == pytest.approx((0.74 + 0.78 + 0.5) / 3)
    small = means[(means["size"] == 28) & (means["regime"] == "1%")].set_index("variant")
    assert small.loc["resnet_a · logreg", "acc_mean"] == pytest.approx(0.82)
    assert small.loc["resnet_a · logreg", "n_datasets"] == 2
    md = (files.out / "tables" / "mean_over_datasets_acc.md").read_text()
    assert "| 28 | 1% | 2 | 81.5 | **82.0** | 72.0 |" in md


def test_variants_split_by_distinguishing_fields(tmp_path):
    registry = Registry.in_workdir(tmp_path / "work")
    for policy, seed in itertools.product(("bilinear", "pad"), SEEDS):
        add_run(registry, backbone="resnet_a", method="logreg", size=28, dataset="breastmnist",
                fraction=1.0, seed=seed, resize_policy=policy,
                acc=0.8 if policy == "pad" else 0.7)
    files = report(workdir=tmp_path / "work")
    header = (files.out / "tables" / "per_dataset_acc.md").read_text().splitlines()[2]
    assert "resnet_a · logreg resize_policy=bilinear" in header
    assert "resnet_a · logreg resize_policy=pad" in header


def test_plots_are_written_and_not_blank(filled, tmp_path):
    files = report(workdir=tmp_path / "work")
    names = sorted(p.name for p in files.plots)
    assert names == sorted([
        "fraction_breastmnist_28.png", "fraction_breastmnist_64.png",
        "fraction_pneumoniamnist_28.png", "fraction_pneumoniamnist_64.png",
        "size_breastmnist.png", "size_pneumoniamnist.png", "probe_vs_finetune.png",
    ])
    for path in files.plots:
        assert path.stat().st_size > MIN_PNG_BYTES
        assert ink(path) > MIN_INK, path.name


def test_guideline_names_winner_gap_and_noise(filled, tmp_path):
    text = report(workdir=tmp_path / "work", metric="acc").guideline.read_text()
    rows = {
        tuple(cells[:2]): cells
        for line in text.splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
        and cells[0].isdigit()
    }
    assert len(rows) == 6  # 2 sizes x 3 fraction buckets
    tie = rows[("28", "scarce (≤2%)")]
    assert tie[2] == "**resnet_a · logreg**" and tie[5] == "resnet_a · finetune"
    assert tie[6] == "0.5" and tie[7] == "1.0"
    assert tie[8:11] == ["no", "no", "tie within noise"]
    clear = rows[("64", "abundant (>20%)")]
    assert clear[2] == "**resnet_a · logreg**" and clear[5] == "vit_b · logreg"
    assert clear[6] == "13.0" and clear[8:11] == ["yes", "yes", "clear win"]
    assert "At 64 px with abundant (>20%) labels, use **resnet_a · logreg**" in text


def test_one_seed_has_no_spread(tmp_path):
    registry = Registry.in_workdir(tmp_path / "work")
    for backbone in ("resnet_a", "vit_b"):
        add_run(registry, backbone=backbone, method="logreg", size=28, dataset="breastmnist",
                fraction=1.0, seed=0)
    text = report(workdir=tmp_path / "work").guideline.read_text()
    assert "| — | n/a | yes | CIs separate (one seed) |" in text
    md = (tmp_path / "work" / "report" / "tables" / "per_dataset_acc.md").read_text()
    assert "| breastmnist | 28 | 100% | **83.0** | 73.0 |" in md  # no ± with one seed
    assert not math.isnan(pd.read_csv(tmp_path / "work/report/tables/summary.csv")["acc_mean"][0])


def test_html_is_self_contained(filled, tmp_path):
    files = report(workdir=tmp_path / "work", out=tmp_path / "elsewhere")
    assert files.out == tmp_path / "elsewhere" and files.html.parent == files.out
    page = files.html.read_text()
    assert page.count('src="data:image/png;base64,') == len(files.plots)
    assert "<b>80.0 ± 1.0</b>" in page
    assert "Model-selection guideline" in page and "<b>resnet_a · logreg</b>" in page
    assert 'src="plots/' not in page and "http" not in page
