"""The command line end to end on a tiny synthetic dataset: every verb, and its errors."""

import json

import pytest

from medfm.cli import main

TINY = ["--backbone", "test_resnet", "--weights", "random", "--input-size", "32", "--quiet"]


@pytest.fixture()
def workdir(synthetic_root, tmp_path):
    assert main(["extract", "--dataset", "bloodmnist", "--size", "28", "--data-root",
                 str(synthetic_root), "--workdir", str(tmp_path), *TINY]) == 0
    return tmp_path


def test_probe_results_report(workdir, capsys):
    assert main(["probe", "--workdir", str(workdir), "--fractions", "0.5,1.0", "--seeds", "0,1",
                 "--quiet"]) == 0
    assert main(["probe", "--workdir", str(workdir), "--method", "knn", "--knn-metric",
                 "euclidean", "--shots", "2", "--seeds", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "4 run(s) fitted, 0 already" in out and "1 run(s) fitted" in out
    assert main(["results", "--workdir", str(workdir), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5
    for key in ("dataset", "size", "backbone", "method", "fraction", "shots", "seed", "n_train",
                "acc", "auc"):
        assert key in rows[0]
    assert {r["method"] for r in rows} == {"logreg", "knn"}
    assert all(0.0 <= r["acc"] <= 1.0 for r in rows)
    assert main(["results", "--workdir", str(workdir), "--method", "knn", "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert md.count("| bloodmnist |") == 1
    assert main(["report", "--workdir", str(workdir), "--out", str(workdir / "rep")]) == 0
    assert (workdir / "rep" / "report.html").stat().st_size > 1000


def test_grid_dry_run_prints_the_plan(workdir, tmp_path, synthetic_root, capsys):
    spec = tmp_path / "grid.yaml"
    spec.write_text(
        "datasets: [bloodmnist]\nsizes: [28]\nbackbones: [test_resnet]\nweights: random\n"
        f"input_size: 32\nfractions: [1.0]\nseeds: [0]\nmethods: [logreg]\n"
        f"data_root: {synthetic_root}\n")
    assert main(["grid", str(spec), "--workdir", str(workdir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "extract" in out and "to run" in out


@pytest.mark.parametrize("argv, needle", [
    (["probe", "--fractions", "10"], "0.1"),
    (["probe", "--dataset", "pathmnist"], "medfm extract"),
    (["probe", "--seeds", "x"], "seed"),
    (["report"], "probe"),
    (["grid"], "--preset"),
    (["finetune", "--dataset", "bloodmnist", "--size", "28", "--backbone", "test_resnet",
      "--recipe", "medfmm"], "medfm"),
])
def test_user_errors_exit_2_with_one_line(argv, needle, tmp_path, capsys):
    code = main([*argv, "--workdir", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


@pytest.mark.parametrize("verb, needle", [("results", "no results registry"),
                                          ("report", "no results registry"),
                                          ("stores", "does not exist")])
def test_reading_a_missing_work_directory_creates_nothing(verb, needle, tmp_path, capsys):
    """A mistyped --workdir is one line and exit 2; it used to print no rows (results, stores)
    and leave an empty work directory (with an empty registry) behind."""
    typo = tmp_path / "medfm-wrok"
    assert main([verb, "--workdir", str(typo)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert str(typo) in err and "--workdir" in err
    assert not typo.exists()


def test_every_backbone_spelling_is_one_probe_run_and_one_filter(workdir, capsys):
    """The store was extracted as test_resnet (timm's default tag r160_in1k): probing by the
    tagged id fits nothing new, and results/report filters accept either spelling."""
    base = ["probe", "--workdir", str(workdir), "--fractions", "1.0", "--seeds", "0", "--quiet"]
    assert main([*base, "--backbone", "test_resnet"]) == 0
    assert "1 run(s) fitted" in capsys.readouterr().out
    assert main([*base, "--backbone", "test_resnet.r160_in1k"]) == 0
    assert "0 run(s) fitted, 1 already in the registry" in capsys.readouterr().out
    for spelling in ("test_resnet", "test_resnet.r160_in1k"):
        assert main(["results", "--workdir", str(workdir), "--backbone", spelling,
                     "--format", "json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["backbone"] == "test_resnet.r160_in1k" and row["weights"] == "random"
        assert row["solver"] in ("sklearn", "torch") and row["device"] == "cpu"
