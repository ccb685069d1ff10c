"""Report: tables read back by content, plots by size and ink, guideline verdicts, report.html.

Run: .venv/bin/python -m pytest tests/test_report.py -q

The registry is filled with runs of known metrics (a real SQLite registry; the report reads only
the registry), so every number in the tables can be predicted.
"""

from __future__ import annotations

import itertools
import math
import re

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from medfm.errors import RegistryError
from medfm.report import report
from medfm.store.registry import Registry, ResultRow
from medfm.resolve.keys import ResultKey, canonical_json

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
            resize_policy="bilinear", acc=None, params=None) -> None:
    acc = expected_acc(backbone, method, size, dataset, fraction, seed) if acc is None else acc
    auc = acc + AUC_LIFT
    probe = method != "finetune"
    key = ResultKey(
        dataset=dataset, size=size, data_digest="d" * 32, backbone=backbone,
        weights="pretrained", resize_policy=resize_policy, input_size=224, normalize="backbone",
        feature_kind="prelogits" if probe else "", method=method, selection="val",
        select_metric="acc", fraction=fraction, seed=seed,
        params=canonical_json(params or ({"C_grid": [0.1, 1.0]} if probe else {"recipe": "tiny"})),
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
    assert not (tmp_path / "work").exists()  # a report reads: it creates no work directory


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


def test_old_and_new_medfm_recipes_are_separate_variants(tmp_path):
    """Rows of `medfm` before issue 14 (keyed without `revision`) read as revision 1, apart
    from the step-budget recipe's rows (revision 2), never averaged together."""
    from medfm.resolve.recipes import RECIPES

    registry = Registry.in_workdir(tmp_path / "work")
    for name, seed in itertools.product(("medfm-v1", "medfm"), SEEDS):
        add_run(registry, backbone="resnet_a", method="finetune", size=28,
                dataset="breastmnist", fraction=1.0, seed=seed,
                acc=0.8 if name == "medfm" else 0.7, params=RECIPES[name].key_params())
    files = report(workdir=tmp_path / "work")
    header = (files.out / "tables" / "per_dataset_acc.md").read_text().splitlines()[2]
    assert "revision=1" in header and "revision=2" in header
    assert "revision=null" not in header


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
    # the markup outside the inline scripts (Plotly's bundle names URLs it never fetches)
    markup = re.sub(r"<script\b[^>]*>.*?</script>", "", page, flags=re.S)
    assert markup.count('src="data:image/png;base64,') == len(files.plots)
    assert "<b>80.0 ± 1.0</b>" in page
    assert "Model-selection guideline" in page and "<b>resnet_a · logreg</b>" in page
    assert 'src="plots/' not in page and "http" not in markup
    assert all("src" not in tag for tag in re.findall(r"<script\b[^>]*>", page))  # all inline


# -- robustness (corrupted evaluations), calibration and the guideline beyond accuracy -------
# Real registries through the API: binary scores whose calibration and corruption sensitivity
# are known by construction. A sample's evidence is x = s * (2y - 1) + N(0, 1); P(y = 1 | x) =
# sigmoid(2 s x), so a model scoring sigmoid(k * 2 s x) is calibrated at k = 1 and overconfident
# for k > 1. Corruptions shrink s by `fragility` per severity (the model keeps its clean mapping).

N_TEST = 400
CORRUPTIONS = ("pixelate", "gaussian_noise")  # BreastMNIST has an AlexNet baseline for pixelate
# (backbone, method) -> (clean signal s, overconfidence k, signal lost per severity)
MODELS = {
    ("resnet_a", "logreg"): (1.5, 1.0, 0.15),  # best on clean, calibrated, fragile
    ("vit_b", "logreg"): (1.2, 4.0, 0.03),  # behind on clean, overconfident, robust
    ("resnet_a", "finetune"): (1.0, 2.0, None),  # no corrupted evaluations
}
BOOTSTRAP = 100


def _scores(y: np.ndarray, signal: float, k: float, seed: int) -> np.ndarray:
    x = signal * (2.0 * y - 1.0) + np.random.default_rng(seed).normal(size=y.shape)
    p1 = 1.0 / (1.0 + np.exp(-2.0 * k * signal * x))
    return np.stack([1.0 - p1, p1], axis=1)


def build_scored_registry(workdir, *, corrupted: bool = True) -> Registry:
    """MODELS x seeds (0, 1) on BreastMNIST-28 at 100%, with per-sample scores; with
    `corrupted`, every logreg run scored on CORRUPTIONS at severities 1-5."""
    from types import SimpleNamespace

    from medfm.data import Task
    from medfm.metrics import evaluate

    registry = Registry.in_workdir(workdir)
    for ((backbone, method), (signal, k, fragility)), seed in itertools.product(
            MODELS.items(), (0, 1)):
        y = np.random.default_rng(100 + seed).integers(0, 2, size=(N_TEST, 1))
        key = ResultKey(
            dataset="breastmnist", size=28, data_digest="d" * 32, backbone=backbone,
            weights="pretrained", resize_policy="bilinear", input_size=224,
            normalize="backbone", feature_kind="" if method == "finetune" else "prelogits",
            method=method, selection="val", select_metric="acc", fraction=1.0, seed=seed,
            params=canonical_json({"C_grid": [1.0]}), store_fingerprint="f" * 16)
        clean = _scores(y[:, 0], signal, k, seed)
        metrics = evaluate(y, clean, Task.BINARY, n_bootstrap=BOOTSTRAP)
        registry.add(ResultRow.scored(key, SimpleNamespace(n=100, digest="0" * 16), metrics,
                                      wall_s=1.0), clean, y)
        if not corrupted or fragility is None:
            continue
        for c, corruption in enumerate(CORRUPTIONS):
            for severity in range(1, 6):
                shrunk = signal * (1.0 - fragility * severity)
                p1 = 1.0 / (1.0 + np.exp(-2.0 * k * signal * (
                    shrunk * (2.0 * y[:, 0] - 1.0)
                    + np.random.default_rng([seed, c, severity]).normal(size=N_TEST))))
                scores = np.stack([1.0 - p1, p1], axis=1)
                registry.add_evaluation(key, corruption, severity,
                                        evaluate(y, scores, Task.BINARY, n_bootstrap=BOOTSTRAP),
                                        scores)
    return registry


@pytest.fixture(scope="module")
def scored_report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("scored") / "work"
    registry = build_scored_registry(workdir)
    return registry, report(workdir=workdir)


def _md_rows(path, n_labels: int = 5) -> dict[tuple[str, ...], dict[str, str]]:
    """A Markdown table's body rows, keyed by their `n_labels` leading cells, as
    {column header: cell} (cells stripped)."""
    lines = path.read_text().splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    rows = {}
    for line in lines[4:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[tuple(cells[:n_labels])] = dict(zip(header, cells, strict=True))
    return rows


def _be(registry, backbone, corruption=None, severity=None) -> list[float]:
    """BE of each seed's logreg run on a corruption (None: clean), from the registry API."""
    values = []
    for row in registry.query(backbone=backbone, method="logreg"):
        if corruption is None:
            values.append(1.0 - row.balanced_acc)
            continue
        found = [e for e in registry.evaluations(row.key)
                 if (e["corruption"], e["severity"]) == (corruption, severity)]
        values.append(1.0 - found[0]["balanced_acc"])
    return values


def test_robustness_tables_hold_balanced_error_per_corruption_and_severity(scored_report):
    registry, files = scored_report
    rows = _md_rows(files.out / "tables" / "robustness_be.md")
    resnet, vit = "resnet_a · logreg", "vit_b · logreg"
    worst = rows[("breastmnist", "28", "100%", "pixelate", "5")]
    be = _be(registry, "resnet_a", "pixelate", 5)
    assert worst[resnet] == f"{np.mean(be) * 100:.1f} ± {np.std(be, ddof=1) * 100:.1f}"
    assert worst[vit].startswith("**")  # the robust model has the lowest error there
    clean = rows[("breastmnist", "28", "100%", "clean", "—")]
    assert clean[resnet].startswith(f"**{np.mean(_be(registry, 'resnet_a')) * 100:.1f}")
    assert "resnet_a · finetune" not in rows[("breastmnist", "28", "100%", "clean", "—")]
    assert len(rows) == 1 + len(CORRUPTIONS) * 5
    # severity makes the fragile model worse, monotonically on average
    by_severity = [np.mean(_be(registry, "resnet_a", "pixelate", s)) for s in range(1, 6)]
    assert by_severity[-1] > by_severity[0] + 0.1

    frame = pd.read_csv(files.out / "tables" / "robustness.csv")
    assert len(frame) == 2 * len(CORRUPTIONS) * 5
    assert set(frame["family"]) == {"digital", "noise"}


def test_rbe_follows_medmnistc_with_its_alexnet_baseline(scored_report):
    from medfm.report.robustness import MEDMNISTC_ALEXNET

    registry, files = scored_report
    alexnet_clean, alexnet = MEDMNISTC_ALEXNET["breastmnist"]
    assert (alexnet_clean, alexnet["pixelate"]) == (0.14536340852130336, 0.46127819548872184)
    expected = []
    for seed_row in registry.query(backbone="resnet_a", method="logreg"):
        be_c = np.mean([1.0 - e["balanced_acc"] for e in registry.evaluations(seed_row.key)
                        if e["corruption"] == "pixelate"])
        expected.append((be_c - (1.0 - seed_row.balanced_acc))
                        / (alexnet["pixelate"] - alexnet_clean))
    relative = pd.read_csv(files.out / "tables" / "robustness_relative.csv")
    got = relative[(relative["variant"] == "resnet_a · logreg")
                   & (relative["corruption"] == "pixelate")]
    assert got["rbe"].iloc[0] == pytest.approx(np.mean(expected), rel=1e-12)
    noise = relative[relative["corruption"] == "gaussian_noise"]
    assert noise["rbe"].isna().all()  # no AlexNet baseline for it on BreastMNIST
    rows = _md_rows(files.out / "tables" / "robustness_rbe.md", n_labels=4)
    assert rows[("breastmnist", "28", "100%", "pixelate")]["resnet_a · logreg"] == (
        f"{np.mean(expected):.2f}")
    assert rows[("breastmnist", "28", "100%", "gaussian_noise")]["vit_b · logreg"] == "—"
    mean_row = rows[("breastmnist", "28", "100%", "mean rBE")]
    assert mean_row["vit_b · logreg"].startswith("**")


def test_auc_drop_per_family_and_severity(scored_report):
    registry, files = scored_report
    drops = []
    for row in registry.query(backbone="resnet_a", method="logreg"):
        found = [e for e in registry.evaluations(row.key)
                 if (e["corruption"], e["severity"]) == ("gaussian_noise", 5)]
        drops.append(row.auc - found[0]["auc"])
    rows = _md_rows(files.out / "tables" / "robustness_auc_drop.md")
    cell = rows[("breastmnist", "28", "100%", "noise", "5")]["resnet_a · logreg"]
    assert cell == f"{np.mean(drops) * 100:.1f}" and np.mean(drops) > 0.05


def test_guideline_names_clean_robust_and_calibrated_winners(scored_report):
    _, files = scored_report
    text = files.guideline.read_text()
    sentence = next(line for line in text.splitlines() if line.startswith("- At 28 px"))
    assert "use **resnet_a · logreg**" in sentence
    assert "Most robust: **vit_b · logreg** (mean BE" in sentence
    assert "best calibrated: **resnet_a · logreg**" in sentence
    assert "not the same: the most robust differs from the best on clean data" in sentence
    row = next(line for line in text.splitlines() if line.startswith("| 28 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[11] == "vit_b · logreg" and cells[13] == "resnet_a · logreg"
    assert cells[15] == "no"
    page = files.html.read_text()
    assert "Robustness (MedMNIST-C)" in page and "Relative balanced error rBE" in page


def test_without_corrupted_evaluations_every_section_says_so(tmp_path):
    build_scored_registry(tmp_path / "work", corrupted=False)
    files = report(workdir=tmp_path / "work")
    combined = (files.out / "report.md").read_text()
    assert "No corrupted evaluations in the registry: robustness not measured" in combined
    assert not (files.out / "tables" / "robustness_be.md").exists()
    assert (files.out / "tables" / "calibration_ece.md").exists()
    sentence = next(line for line in files.guideline.read_text().splitlines()
                    if line.startswith("- At 28 px"))
    assert "No corrupted evaluations, so robustness is not measured" in sentence
    assert "best calibrated: **resnet_a · logreg**" in sentence
