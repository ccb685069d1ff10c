"""Leaderboard: mean ranks, Friedman and post-hoc tests, CD diagrams, formats, missing data.

Run: .venv/bin/python -m pytest tests/test_leaderboard.py -q

The work directory holds real kNN probe rows of 4 backbones on real BreastMNIST and
PneumoniaMNIST and two synthetic datasets (tests/ranked_workdir.py); every figure the
leaderboard prints is recomputed here from the registry's rows by independent code (pandas
ranks, scipy's Friedman test, Demsar's table of q_alpha).
"""

from __future__ import annotations

import io
import json
import math
import sys

import matplotlib.image
import pandas as pd
import pytest
from scipy.stats import friedmanchisquare

from medfm.cli import main
from medfm.report.leaderboard import leaderboard, leaderboard_section
from medfm.store.registry import Registry
from tests.ranked_workdir import BACKBONES, DATASETS, FRACTIONS, PARTIAL
from tests.test_report import add_run

# Demsar (2006), Table 5(a): critical values q_0.05 of the two-tailed Nemenyi test, k = 2..6
DEMSAR_Q05 = {2: 1.960, 3: 2.343, 4: 2.569, 5: 2.728, 6: 2.850}
MIN_PNG_BYTES = 5_000


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def independent_ranks(workdir) -> dict[float, pd.DataFrame]:
    """Per fraction: (dataset x backbone) seed-mean AUC straight from the registry's rows."""
    rows = Registry.in_workdir(workdir).to_dataframe()
    means = rows.groupby(["fraction", "dataset", "backbone"])["auc"].mean()
    return {f: means.loc[f].unstack("backbone") for f in FRACTIONS}


def test_json_mean_ranks_and_friedman_match_independent_computations(ranked_workdir, capsys,
                                                                     tmp_path):
    code, out, err = run_cli(capsys, "leaderboard", "--workdir", str(ranked_workdir),
                             "--format", "json", "--out", str(tmp_path / "cd"))
    assert code == 0, err
    board = json.loads(out)
    assert [b["fraction"] for b in board["blocks"]] == list(FRACTIONS)
    for block, (fraction, table) in zip(board["blocks"], independent_ranks(ranked_workdir).items(),
                                        strict=True):
        assert block["fraction"] == fraction
        assert block["paradigm"] == "kNN" and block["size"] == 28
        assert block["datasets"] == sorted(DATASETS)
        entries = {e["backbone"]: e for e in block["entries"]}
        assert set(entries) == set(BACKBONES)  # the backbone missing a dataset is shown
        ranks = table.rank(axis=1, ascending=False, method="average")
        for backbone, entry in entries.items():
            assert entry["mean_rank"] == pytest.approx(ranks[backbone].mean()), backbone
            assert entry["rank_sum"] == pytest.approx(ranks[backbone].sum())
            assert entry["n_datasets"] == ranks[backbone].notna().sum()
            assert entry["auc_mean"] == pytest.approx(table[backbone].mean())
            assert entry["auc_ci_low"] < entry["auc_mean"] < entry["auc_ci_high"]
        partial, dataset = PARTIAL
        assert entries[partial]["missing"] == [dataset] and not entries[partial]["in_test"]
        assert block["entries"][-1]["backbone"] == partial  # listed after the complete ones
        assert any(partial in note and "left out of the Friedman test" in note
                   for note in block["notes"])

        complete = table.drop(columns=partial)
        statistic, p_value = friedmanchisquare(*(complete[c] for c in complete.columns))
        test = block["test"]
        assert test["p_value"] == pytest.approx(p_value, rel=1e-12)
        assert test["statistic"] == pytest.approx(statistic, rel=1e-12)
        assert sorted(test["variants"]) == sorted(e["variant"] for e in block["entries"]
                                                  if e["in_test"])
        k, n = len(test["variants"]), len(DATASETS)
        assert test["critical_difference"] == pytest.approx(
            DEMSAR_Q05[k] * math.sqrt(k * (k + 1) / (6 * n)), abs=2e-3)
        for a, row in test["pairwise_p"].items():
            for b, p in row.items():
                assert 0 <= p <= 1 and p == pytest.approx(test["pairwise_p"][b][a])
        png, svg = test["diagram_png"], test["diagram_svg"]
        assert png.startswith(str(tmp_path / "cd")) and svg.endswith(".svg")
        assert (tmp_path / "cd" / png.split("/")[-1]).stat().st_size > MIN_PNG_BYTES
        assert matplotlib.image.imread(png).shape[1] > 600
        assert "<svg" in open(svg).read(2000)


def test_fewer_datasets_than_asked_and_no_test_are_said(ranked_workdir, capsys, tmp_path):
    asked = "breastmnist,pneumoniamnist,bloodmnist,organamnist,dermamnist"
    code, out, err = run_cli(capsys, "leaderboard", "--workdir", str(ranked_workdir),
                             "--dataset", asked, "--backbone", "proj4_net.t,proj16_net.t",
                             "--out", str(tmp_path / "cd"), "--format", "md")
    assert code == 0, err
    assert "over 4 of the 5 datasets asked for: no result on dermamnist" in out
    assert "no Friedman test: it needs at least 3 variants" in out
    assert not (tmp_path / "cd").exists()  # no test, no diagram


def test_formats_agree(ranked_workdir, capsys, tmp_path):
    args = ("leaderboard", "--workdir", str(ranked_workdir), "--out", str(tmp_path),
            "--no-diagrams")
    board = json.loads(run_cli(capsys, *args, "--format", "json")[1])
    code, out, _ = run_cli(capsys, *args, "--format", "csv")
    frame = pd.read_csv(io.StringIO(out))
    assert code == 0 and len(frame) == sum(len(b["entries"]) for b in board["blocks"])
    first = board["blocks"][0]["entries"][0]
    assert frame.iloc[0]["mean_rank"] == pytest.approx(first["mean_rank"])
    assert frame.iloc[0]["friedman_p"] == pytest.approx(board["blocks"][0]["test"]["p_value"])
    md = run_cli(capsys, *args, "--format", "md")[1]
    assert f"| 1 | {first['variant']} | **{first['mean_rank']:.2f}** |" in md
    tex = run_cli(capsys, *args, "--format", "tex")[1]
    assert tex.count(r"\begin{tabular}") == len(board["blocks"]) and "Friedman" in tex
    table = run_cli(capsys, *args)[1]
    assert "mean rank" in table and "critical difference" in table
    assert "CD diagram" not in table and not list(tmp_path.iterdir())  # --no-diagrams


def test_wilcoxon_holm_and_acc(ranked_workdir, tmp_path):
    board = leaderboard(workdir=ranked_workdir, out=tmp_path, metric="acc",
                        posthoc="wilcoxon-holm")
    rows = Registry.in_workdir(ranked_workdir).to_dataframe(fraction=1.0)
    acc = rows.groupby(["dataset", "backbone"])["acc"].mean().unstack()
    block = board.blocks[1]
    for entry in block.entries:
        assert entry.mean_rank == pytest.approx(
            acc.rank(axis=1, ascending=False)[entry.backbone].mean())
    assert block.test.critical_difference is None and block.test.posthoc == "wilcoxon-holm"
    # 4 datasets: the smallest two-sided exact Wilcoxon p is 2/2^4 = 0.125, Holm only raises it
    assert min(p for row in block.test.pairwise_p.values() for p in row.values()) >= 0.125
    assert (tmp_path / "cd_knn_28_100pct_acc.png").exists()


def test_section_for_the_report_is_plain_data(ranked_workdir, tmp_path):
    frame = Registry.in_workdir(ranked_workdir).to_dataframe()
    section = leaderboard_section(frame, tmp_path)
    json.dumps(section, allow_nan=False)  # plain, JSON-ready data
    assert all(b["test"]["diagram_png"].startswith(str(tmp_path)) for b in section["blocks"])
    assert section["blocks"][0]["entries"][0]["place"] == 1


@pytest.mark.parametrize("argv, says", [
    (["--alpha", "1.5"], "alpha must be a number strictly between 0 and 1"),
    (["--dataset", "dermamnist"], "no results in"),
    (["--metric", "f1"], "invalid choice"),
])
def test_bad_options_are_one_line(ranked_workdir, capsys, argv, says):
    try:
        code = main(["leaderboard", "--workdir", str(ranked_workdir), *argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_ties_everywhere_give_no_test_and_no_traceback(tmp_path):
    registry = Registry.in_workdir(tmp_path / "w")
    for backbone in ("a_net", "b_net", "c_net"):
        for dataset in ("breastmnist", "pneumoniamnist"):
            add_run(registry, backbone=backbone, method="logreg", size=28, dataset=dataset,
                    fraction=1.0, seed=0, acc=0.8)
    (block,) = leaderboard(workdir=tmp_path / "w", out=tmp_path / "cd").blocks
    assert block.test is None and [e.mean_rank for e in block.entries] == [2.0, 2.0, 2.0]
    assert "the variants tie on every dataset" in " ".join(block.notes)
    assert not (tmp_path / "cd").exists()


def test_without_scikit_posthocs_it_names_the_extra(ranked_workdir, capsys, tmp_path,
                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "scikit_posthocs", None)  # import fails as if absent
    code, out, err = run_cli(capsys, "leaderboard", "--workdir", str(ranked_workdir),
                             "--out", str(tmp_path))
    assert code == 2 and not out and len(err.strip().splitlines()) == 1
    assert "pip install 'medfm[leaderboard]'" in err


def test_no_registry_is_one_line_and_creates_nothing(tmp_path, capsys):
    code, _, err = run_cli(capsys, "leaderboard", "--workdir", str(tmp_path / "none"))
    assert code == 2 and "no results registry" in err and not (tmp_path / "none").exists()


def test_the_report_carries_the_leaderboard(ranked_workdir, tmp_path, capsys):
    """`medfm report` has the leaderboard `medfm leaderboard` prints (same blocks, same mean
    ranks), its notes, and each block's CD diagram among the report's figures."""
    from medfm.report import report

    files = report(workdir=ranked_workdir, out=tmp_path / "report", metric="auc")
    page = (tmp_path / "report" / "report.md").read_text()
    assert "## Leaderboard (mean rank by AUC, Friedman and Nemenyi tests)" in page
    code, out, _ = run_cli(capsys, "leaderboard", "--workdir", str(ranked_workdir), "--format",
                           "md", "--no-diagrams")
    assert code == 0
    for line in out.splitlines():
        if line.startswith("| ") and "---" not in line and "place" not in line:
            assert line in page  # every ranked row, as printed
    diagrams = [p for p in files.plots if p.name.startswith("cd_") or "leaderboard" in p.name]
    assert len(diagrams) == len(FRACTIONS) and all(p.exists() for p in diagrams)
