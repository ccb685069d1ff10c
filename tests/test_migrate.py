"""Old work directories keep working: a workdir written by medfm before registry schema 2 and
store layout 2 (tests/fixtures/workdir-v1, made by commit f733c58 on real BreastMNIST) reruns
the commands that made it with nothing recomputed, and every row is found by its new key.

Run: .venv/bin/python -m pytest tests/test_migrate.py -q
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from medfm.cli import main
from medfm.data import get_dataset
from medfm.store.features import FeatureStore, list_stores
from medfm.store.migrate import v1_attrs
from medfm.store.registry import SCHEMA_VERSION, Registry

FIXTURE = Path(__file__).parent / "fixtures" / "workdir-v1"
OLD_STORE = "breastmnist_28__test_resnet.r160_in1k__bilinear32__prelogits-float16__1d126fa57859.h5"
TINY = ["--backbone", "test_resnet", "--weights", "random", "--input-size", "32"]
# the commands that made the fixture (fixtures/workdir-v1/README.md); --backend is --solver now,
# and the probe's C rule of then is `--select-by primary` since val log-loss became the default;
# the fine-tune recipe of then is `medfm-v1` since `medfm` got a step budget (issue 14)
COMMANDS = [
    (["extract", "--dataset", "breastmnist", "--size", "28", *TINY], "already extracted"),
    (["probe", "--dataset", "breastmnist", "--fractions", "0.1,1.0", "--seeds", "0,1",
      "--select-by", "primary"], "0 run(s) fitted, 4 already in the registry"),
    (["probe", "--dataset", "breastmnist", "--fractions", "0.1", "--seeds", "0", "--backend",
      "torch", "--select-by", "primary"], "0 run(s) fitted, 1 already in the registry"),
    (["probe", "--dataset", "breastmnist", "--method", "knn", "--fractions", "1.0", "--seeds",
      "0"], "0 run(s) fitted, 1 already in the registry"),
    (["finetune", "--dataset", "breastmnist", "--size", "28", *TINY, "--epochs", "1",
      "--batch-size", "32", "--fractions", "0.5", "--seeds", "0", "--recipe", "medfm-v1"],
     "0 run(s) trained, 1 already in the registry"),
]


@pytest.fixture
def old_workdir(tmp_path) -> Path:
    workdir = tmp_path / "work"
    shutil.copytree(FIXTURE, workdir, ignore=shutil.ignore_patterns("README.md"))
    return workdir


def _v1_rows(workdir: Path) -> list[dict]:
    with sqlite3.connect(workdir / "registry.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        return [dict(r) for r in conn.execute("SELECT * FROM results ORDER BY rowid")]


def _refuse(*args, **kwargs):
    raise AssertionError("a migrated workdir must not load a model, images or features")


def test_old_workdir_reruns_with_nothing_recomputed(old_workdir, real_root, monkeypatch,
                                                    capsys):
    old = _v1_rows(old_workdir)
    assert len(old) == 7 and {r["backbone"] for r in old} == {"test_resnet"}
    for target in ("medfm.extract.extractor.create_backbone", "medfm.finetune.run.create_backbone",
                   "medfm.finetune.run.load_split", "medfm.probe.run.StoreArrays.load"):
        monkeypatch.setattr(target, _refuse)
    for argv, expected in COMMANDS:
        code = main([*argv, "--workdir", str(old_workdir), "--data-root", str(real_root),
                     "--quiet"] if argv[0] != "probe" else
                    [*argv, "--workdir", str(old_workdir), "--quiet"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert expected in out, (argv, out)

    registry = Registry.in_workdir(old_workdir)
    rows = registry.query()
    # the sklearn and torch fits of one subset are one run now: the older one stays
    assert len(rows) == 6
    assert {r.created_at for r in rows} < {r["created_at"] for r in old}
    kept = {(r.key.method, r.key.fraction, r.key.seed, r.solver) for r in rows}
    assert ("logreg", 0.1, 0, "sklearn") in kept and ("logreg", 0.1, 0, "torch") not in kept
    official = get_dataset("breastmnist").md5(28)
    for row in rows:
        assert row.key.backbone == "test_resnet.r160_in1k" and row.key.weights == "random"
        assert row.key.data_digest == official and row.key.normalize == "backbone"
        y_true, y_score = registry.scores(row.key)  # every row kept its test scores
        assert len(y_true) == len(y_score) == 156
    by_method = {r.key.method: r for r in rows}
    assert (by_method["knn"].key.selection, by_method["knn"].key.select_metric) == ("none", "")
    tuned = by_method["finetune"]
    assert (tuned.key.selection, tuned.key.select_metric, tuned.device) == ("val", "acc", "cpu")
    assert "resize_policy" not in json.loads(tuned.key.params)
    with sqlite3.connect(old_workdir / "registry.sqlite") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        merged = conn.execute("SELECT backend FROM results_v1_merged").fetchall()
    assert merged == [("torch",)]

    # the store answers to its request's name; the fine-tune's weights follow its new key
    (store,) = list_stores(old_workdir)
    assert store["status"] == "complete" and not (old_workdir / "stores" / OLD_STORE).exists()
    assert FeatureStore(store["path"]).request["backbone"] == "test_resnet.r160_in1k"
    assert (old_workdir / "checkpoints" / tuned.key.digest() / "best.pt").is_file()

    for spelling in ("test_resnet", "test_resnet.r160_in1k", " test_resnet "):
        assert main(["results", "--backbone", spelling, "--format", "json", "--workdir",
                     str(old_workdir)]) == 0
        assert len(json.loads(capsys.readouterr().out)) == 6


def test_an_old_store_opened_by_its_path_reads_as_the_new_layout(tmp_path):
    """`medfm probe --store PATH` on a layout-1 file outside any work directory."""
    path = tmp_path / OLD_STORE
    shutil.copy(FIXTURE / "stores" / OLD_STORE, path)
    store = FeatureStore(path)
    assert store.request["weights"] == "random" and store.request["input_size"] == 32
    assert store.request["data_digest"] == get_dataset("breastmnist").md5(28)
    assert v1_attrs({**store.attrs, "format_version": 1})["request_json"] == store.attrs[
        "request_json"]


def test_an_early_layout_1_store_is_one_clear_error(tmp_path, capsys):
    """A layout-1 store written before its preprocessing was recorded (medfm's first synthetic
    writer: no `preprocess_json`, no `data_md5`) cannot be mapped to a request: opening it, and
    any command that asks for its dataset, is one line naming the file and what to do, exit 2,
    and the file stays as it was."""
    import h5py

    from medfm.errors import StoreError

    stores = tmp_path / "work" / "stores"
    stores.mkdir(parents=True)
    path = stores / OLD_STORE
    shutil.copy(FIXTURE / "stores" / OLD_STORE, path)
    with h5py.File(path, "r+") as fh:
        del fh.attrs["preprocess_json"]
    before = path.read_bytes()
    with pytest.raises(StoreError, match="early layout.*preprocess_json.*rebuild|"
                                         "early layout.*preprocess_json.*delete"):
        FeatureStore(path)
    capsys.readouterr()
    code = main(["probe", "--dataset", "breastmnist", "--fractions", "0.1", "--seeds", "0",
                 "--workdir", str(tmp_path / "work")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "early layout" in err[0], err
    assert path.read_bytes() == before
