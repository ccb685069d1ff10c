"""Results registry: key identity, add/get/replace, scores, queries, concurrent writers, corruption.

Run: .venv/bin/python -m pytest tests/test_registry.py -q
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from medfm.errors import InvalidArgumentError, RegistryError
from medfm.store.registry import (
    DATAFRAME_COLUMNS,
    REGISTRY_FILENAME,
    SCHEMA_VERSION,
    Registry,
    ResultRow,
)
from medfm.resolve.keys import RESULT_KEY_FIELDS, ResultKey, canonical_json

N_WORKERS = 4  # concurrent writer processes
ROWS_PER_WORKER = 50
SHARED_SEEDS = range(1000, 1010)  # keys every worker adds


def make_key(**changes) -> ResultKey:
    """A realistic logreg key; `changes` override fields."""
    fields = dict(
        dataset="breastmnist",
        size=28,
        data_digest="750601b1f35ba3300ea97c75c52ff8f6",
        backbone="resnet18.a1_in1k",
        weights="pretrained",
        resize_policy="bilinear",
        input_size=224,
        normalize="backbone",
        feature_kind="prelogits",
        method="logreg",
        params=canonical_json({"C_grid": [0.001, 0.1, 10.0], "max_iter": 1000}),
        selection="val",
        select_metric="acc",
        fraction=0.1,
        shots=None,
        seed=0,
        store_fingerprint="cd" * 32,
    )
    fields.update(changes)
    return ResultKey(**fields)


def make_row(key: ResultKey, **changes) -> ResultRow:
    """A filled-in row for `key`; `changes` override fields."""
    fields = dict(
        key=key,
        n_train=54,
        subset_digest="ef" * 32,
        chosen_C=0.1,
        acc=0.8125,
        auc=0.875,
        balanced_acc=0.75,
        acc_ci_low=0.75,
        acc_ci_high=0.875,
        auc_ci_low=0.8,
        auc_ci_high=0.95,
        extra={"grid": [0.001, 0.1, 10.0], "converged": True, "iterations": 37},
        versions={"medfm": "0.1.0", "sklearn": "1.5.0"},
        wall_s=1.25,
        created_at="2025-01-02T03:04:05+00:00",
    )
    fields.update(changes)
    return ResultRow(**fields)


# -- key identity ---------------------------------------------------------------------------


def test_key_fields_are_exactly_the_result_changing_fields():
    assert set(RESULT_KEY_FIELDS) == {
        "dataset", "size", "data_digest", "backbone", "weights", "resize_policy", "input_size",
        "normalize", "feature_kind", "method", "params", "selection", "select_metric",
        "fraction", "shots", "seed", "store_fingerprint",
    }  # how a run computed (solver, device, the loaded tensors' digest) is provenance
    assert not {"solver", "device", "weights_digest"} & set(RESULT_KEY_FIELDS)


def test_digest_is_pinned_and_identical_in_other_processes():
    digest = make_key().digest()
    # Pinned: a change to the canonical form orphans every existing registry unless a schema
    # migration re-keys its rows (schema 2 did: medfm.store.migrate).
    assert digest == "f939a808a15f2e95fbde32c53ed66aa1e5e750d6ad6815521a6216bf2ca2b223"
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_registry import make_key; "
        "print(make_key().digest())"
    )
    for hash_seed in ("1", "2"):
        child = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": hash_seed, "PATH": ""}, cwd=str(_repo_root()),
        )
        assert child.stdout.strip() == digest


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def test_digest_ignores_params_key_order_and_number_spelling():
    a = make_key(params='{"k": 11, "metric": "cosine"}', fraction=1, size=np.int64(28))
    b = make_key(params='{ "metric":"cosine","k":11 }', fraction=1.0, size=28)
    assert a == b and a.digest() == b.digest()


_CHANGED = {
    "dataset": "pneumoniamnist", "size": 64, "data_digest": "00" * 16,
    "backbone": "resnet18.tv_in1k", "weights": "random", "resize_policy": "pad",
    "input_size": 256, "normalize": "half", "feature_kind": "tokens_mean", "method": "knn",
    "params": '{"C_grid": [1.0]}', "selection": "holdout", "select_metric": "auc",
    "fraction": 0.01, "shots": 5, "seed": 1, "store_fingerprint": "11" * 32,
}


@pytest.mark.parametrize("name", RESULT_KEY_FIELDS)
def test_digest_changes_when_any_key_field_changes(name):
    base = make_key()
    changed = dataclasses.replace(base, **{name: _CHANGED[name]})
    assert changed.digest() != base.digest()


def test_key_rejects_non_json_params():
    with pytest.raises(InvalidArgumentError, match="canonical_json"):
        make_key(params="C=1")


# -- add / get / replace / scores ------------------------------------------------------------


def test_add_then_get_roundtrips_every_field(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    row = make_row(make_key(fraction=None, shots=10))
    assert not reg.has(row.key)
    assert reg.add(row) is True
    assert reg.has(row.key) and reg.has(row.key.digest())
    assert reg.get(row.key) == row
    assert reg.get(row.key.digest()) == row
    assert reg.get(make_key(seed=99)) is None
    assert len(reg) == 1
    # a second handle (as another process would open it) sees the same row
    assert Registry(tmp_path / "r.sqlite").get(row.key) == row


def test_created_at_is_filled_and_nan_metrics_survive(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    row = make_row(make_key(), created_at="", auc=math.nan, auc_ci_low=math.nan, chosen_C=None)
    reg.add(row)
    got = reg.get(row.key)
    assert got.created_at.endswith("+00:00") and got.created_at[:2] == "20"
    assert math.isnan(got.auc) and math.isnan(got.auc_ci_low) and got.chosen_C is None
    assert got.acc == row.acc


def test_rerun_of_same_key_is_a_noop(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    first = make_row(make_key())
    assert reg.add(first, np.ones((3, 2), np.float32), np.array([0, 1, 1]))
    assert reg.add(make_row(make_key(), acc=0.1), np.zeros((3, 2)), np.array([1, 1, 1])) is False
    assert reg.get(first.key) == first
    y_true, _ = reg.scores(first.key)
    np.testing.assert_array_equal(y_true, [0, 1, 1])
    assert len(reg) == 1


def test_replace_overwrites_row_and_scores(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    key = make_key()
    reg.add(make_row(key), np.ones((3, 2)), np.array([0, 1, 1]))
    newer = make_row(key, acc=0.5, extra={"converged": False})
    assert reg.add(newer, replace=True) is True
    assert reg.get(key) == newer and len(reg) == 1
    with pytest.raises(RegistryError, match="without per-sample scores"):
        reg.scores(key)  # the old run's scores went with it
    assert reg.add(newer, np.full((2, 2), 0.25), np.array([1, 0]), replace=True)
    np.testing.assert_array_equal(reg.scores(key)[1], np.full((2, 2), 0.25, np.float32))


def test_scores_roundtrip_exactly(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    rng = np.random.default_rng(0)
    y_score = rng.random((156, 14), dtype=np.float32)  # multi-label shape
    y_true = rng.integers(0, 2, (156, 14)).astype(np.uint8)
    key = make_key(dataset="chestmnist")
    reg.add(make_row(key), y_score, y_true)
    got_true, got_score = reg.scores(key)
    assert got_score.dtype == np.float32 and got_true.dtype == np.uint8
    np.testing.assert_array_equal(got_score, y_score)
    np.testing.assert_array_equal(got_true, y_true)
    with pytest.raises(RegistryError, match="is not there"):
        reg.scores(make_key(seed=7))


def test_add_rejects_mismatched_scores(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    with pytest.raises(InvalidArgumentError, match="same samples"):
        reg.add(make_row(make_key()), np.ones((3, 2)), np.array([0, 1]))
    with pytest.raises(InvalidArgumentError, match="both"):
        reg.add(make_row(make_key()), np.ones((3, 2)))
    assert len(reg) == 0


# -- query / dataframe / planning --------------------------------------------------------------


def _fill(reg: Registry) -> list[ResultKey]:
    keys = [
        make_key(dataset=d, method=m, fraction=f, seed=s)
        for d in ("breastmnist", "pneumoniamnist")
        for m in ("logreg", "knn")
        for f in (0.1, 1.0)
        for s in (0, 1)
    ]
    keys.append(make_key(fraction=None, shots=5))
    for i, key in enumerate(keys):
        reg.add(make_row(key, acc=i / 100))
    return keys


def test_query_filters_scalar_list_and_none(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    keys = _fill(reg)
    assert len(reg.query()) == len(keys) == 17
    rows = reg.query(dataset="pneumoniamnist", method="knn")
    assert len(rows) == 4
    assert all(r.key.dataset == "pneumoniamnist" and r.key.method == "knn" for r in rows)
    assert {r.key.seed for r in reg.query(seed=[1], fraction=[0.1, 1.0])} == {1}
    assert len(reg.query(seed=[1], fraction=[0.1, 1.0])) == 8
    assert [r.key.shots for r in reg.query(fraction=None)] == [5]
    assert len(reg.query(fraction=[None, 0.1])) == 9
    assert len(reg.query(seed=np.int64(0), dataset="breastmnist")) == 5
    assert reg.query(dataset="dermamnist") == []
    with pytest.raises(InvalidArgumentError, match="acc"):
        reg.query(acc=0.5)


def test_to_dataframe_columns_and_values(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    keys = _fill(reg)
    frame = reg.to_dataframe(method="logreg")
    assert list(frame.columns) == list(DATAFRAME_COLUMNS)
    assert set(RESULT_KEY_FIELDS) | {"acc", "auc_ci_high", "n_train", "chosen_C", "wall_s",
                                     "created_at", "digest"} <= set(frame.columns)
    assert len(frame) == 9 and set(frame["method"]) == {"logreg"}
    by_digest = frame.set_index("digest")
    assert by_digest.loc[keys[0].digest(), "acc"] == 0.0
    assert by_digest.loc[keys[-1].digest(), "shots"] == 5
    assert math.isnan(by_digest.loc[keys[-1].digest(), "fraction"])
    empty = reg.to_dataframe(dataset="dermamnist")
    assert empty.empty and list(empty.columns) == list(DATAFRAME_COLUMNS)


def test_done_keys_in_one_query_for_a_big_grid(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    done = _fill(reg)
    planned = [make_key(seed=s, method="finetune") for s in range(40_000)] + done[:3]
    assert reg.done_keys(planned) == {k.digest() for k in done[:3]}  # over SQLite's arg limit
    assert reg.done_keys([]) == set()


def test_in_workdir_uses_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_WORKDIR", str(tmp_path / "work"))
    reg = Registry.in_workdir()
    assert reg.path == tmp_path / "work" / REGISTRY_FILENAME and reg.path.exists()
    assert Registry.in_workdir(tmp_path / "other").path == tmp_path / "other" / REGISTRY_FILENAME


# -- concurrency -------------------------------------------------------------------------------


def _worker_keys(worker: int) -> list[ResultKey]:
    """Worker i adds seeds [20 i, 20 i + 40) (overlapping its neighbour) plus SHARED_SEEDS."""
    own = range(20 * worker, 20 * worker + ROWS_PER_WORKER - len(SHARED_SEEDS))
    return [make_key(seed=s) for s in (*own, *SHARED_SEEDS)]


def _add_concurrently(path: str, worker: int, start, results) -> None:
    """Child process: open the registry at the same moment as the others and add 50 rows."""
    start.wait()
    reg = Registry(path)  # opening races too: schema creation and the switch to WAL
    won = [reg.add(make_row(k), np.full((4, 2), worker, np.float32), np.arange(4))
           for k in _worker_keys(worker)]
    results.put((worker, sum(won)))


def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path):
    path = str(tmp_path / "r.sqlite")
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(N_WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_add_concurrently, args=(path, i, start, results))
             for i in range(N_WORKERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0] * N_WORKERS  # no "database is locked"
    wins = dict(results.get(timeout=5) for _ in procs)
    distinct = {k.digest() for w in range(N_WORKERS) for k in _worker_keys(w)}
    assert len(distinct) == 20 * (N_WORKERS - 1) + 40 + len(SHARED_SEEDS)
    assert sum(wins.values()) == len(distinct)  # each key won by exactly one add
    reg = Registry(path)
    assert len(reg) == len(distinct)
    assert {r.key.digest() for r in reg.query()} == distinct
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == len(distinct)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


# -- broken files ------------------------------------------------------------------------------


def test_garbage_file_raises_registry_error(tmp_path):
    path = tmp_path / "registry.sqlite"
    path.write_bytes(np.random.default_rng(0).bytes(8192))
    with pytest.raises(RegistryError, match="move it aside"):
        Registry(path)


def test_newer_schema_is_refused_and_version_recorded(tmp_path):
    path = tmp_path / "r.sqlite"
    Registry(path)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(RegistryError, match="upgrade medfm"):
        Registry(path)


def test_extra_and_versions_are_json(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    with pytest.raises(InvalidArgumentError, match="JSON"):
        reg.add(make_row(make_key(), extra={"model": object()}))
    reg.add(make_row(make_key(), extra={"curve": [0.5, 0.75]}))
    raw = sqlite3.connect(tmp_path / "r.sqlite").execute("SELECT extra FROM results").fetchone()
    assert json.loads(raw[0]) == {"curve": [0.5, 0.75]}


# -- calibration columns (schema 3) and corrupted evaluations ----------------------------------


def _scored_row(key: ResultKey, seed: int = 0, n: int = 120, shift: float = 0.0):
    """(row, y_score, y_true) of real binary scores, as a probe would record them."""
    from medfm.data import Task
    from medfm.metrics import evaluate

    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, size=(n, 1)).astype(np.uint8)
    logit = 2.0 * (y_true[:, 0] - 0.5) + rng.normal(size=n) + shift
    p1 = 1.0 / (1.0 + np.exp(-logit))
    y_score = np.stack([1 - p1, p1], axis=1).astype(np.float32)
    metrics = evaluate(y_true, y_score, Task.BINARY, n_bootstrap=200)

    class Subset:  # what ResultRow.scored reads of a sampling.Subset
        n, digest = 54, "ef" * 32

    return ResultRow.scored(key, Subset, metrics, wall_s=1.0), y_score, y_true, metrics


def test_scored_rows_carry_calibration_and_its_cis(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    row, y_score, y_true, metrics = _scored_row(make_key())
    reg.add(row, y_score, y_true)
    got = reg.get(row.key)
    assert (got.ece, got.brier, got.nll) == (metrics.ece, metrics.brier, metrics.nll)
    assert (got.ece_ci_low, got.ece_ci_high) == metrics.ece_ci
    assert (got.nll_ci_low, got.nll_ci_high) == metrics.nll_ci
    assert (got.balanced_acc_ci_low, got.balanced_acc_ci_high) == metrics.balanced_acc_ci
    assert 0 < got.ece < 1 and got.brier > 0 and got.nll > 0


def _as_schema_2(path) -> None:
    """Turn a registry written by this code into the schema-2 file medfm wrote before
    calibration: no calibration columns, no evaluations table, user_version 2."""
    con = sqlite3.connect(path)
    for name in ("balanced_acc_ci_low", "balanced_acc_ci_high", "ece", "ece_ci_low",
                 "ece_ci_high", "brier", "brier_ci_low", "brier_ci_high", "nll", "nll_ci_low",
                 "nll_ci_high"):
        con.execute(f"ALTER TABLE results DROP COLUMN {name}")
    con.execute("DROP TABLE evaluations")
    con.execute("PRAGMA user_version = 2")
    con.commit()
    con.close()


def test_schema_2_registry_gains_calibration_from_its_stored_scores(tmp_path):
    from medfm.data import Task
    from medfm.metrics import evaluate

    path = tmp_path / "r.sqlite"
    reg = Registry(path)
    scored = [_scored_row(make_key(seed=s), seed=s) for s in range(3)]
    for row, y_score, y_true, _ in scored:
        reg.add(row, y_score, y_true)
    no_scores = make_row(make_key(seed=9))
    reg.add(no_scores)
    reg.close()
    _as_schema_2(path)

    migrated = Registry(path)  # opening migrates 2 -> 3
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 0
    con.close()
    for row, y_score, y_true, metrics in scored:
        got = migrated.get(row.key)
        # the stored float32 scores give what a rerun gives (evaluate's 1000 resamples, seed 0)
        rerun = evaluate(y_true, y_score, Task.BINARY)
        assert got.ece == pytest.approx(rerun.ece, abs=1e-12) and got.ece == pytest.approx(
            metrics.ece, abs=1e-6)
        assert (got.brier, got.nll) == (pytest.approx(rerun.brier), pytest.approx(rerun.nll))
        assert (got.ece_ci_low, got.ece_ci_high) == pytest.approx(rerun.ece_ci)
        assert (got.brier_ci_low, got.nll_ci_high) == pytest.approx(
            (rerun.brier_ci[0], rerun.nll_ci[1]))
        assert (got.balanced_acc_ci_low, got.balanced_acc_ci_high) == pytest.approx(
            rerun.balanced_acc_ci)
        assert got.acc == row.acc and got.auc_ci_low == row.auc_ci_low  # kept as stored
    left = migrated.get(no_scores.key)
    assert math.isnan(left.ece) and math.isnan(left.nll) and left.acc == no_scores.acc
    frame = migrated.to_dataframe()
    assert frame["ece"].notna().sum() == 3


def test_evaluations_are_stored_once_and_read_back(tmp_path):
    from medfm.data import Task
    from medfm.metrics import evaluate

    reg = Registry(tmp_path / "r.sqlite")
    row, y_score, y_true, _ = _scored_row(make_key())
    reg.add(row, y_score, y_true)
    stored = {}
    for corruption, severity in (("pixelate", 1), ("pixelate", 5), ("gaussian_noise", 3)):
        noisy = np.clip(y_score + 0.1 * severity * np.random.default_rng(severity).normal(
            size=y_score.shape), 0.01, 0.99)
        metrics = evaluate(y_true, noisy, Task.BINARY, n_bootstrap=50)
        assert reg.add_evaluation(row.key, corruption, severity, metrics, noisy) is True
        stored[(corruption, severity)] = (metrics, noisy)
    again = stored[("pixelate", 1)]
    assert reg.add_evaluation(row.key.digest(), "pixelate", 1, *again) is False  # a no-op

    got = reg.evaluations(row.key)
    assert [(e["corruption"], e["severity"]) for e in got] == [
        ("gaussian_noise", 3), ("pixelate", 1), ("pixelate", 5)]
    for e in got:
        metrics, noisy = stored[(e["corruption"], e["severity"])]
        assert (e["ece"], e["brier_ci_high"], e["auc"]) == (
            metrics.ece, metrics.brier_ci[1], metrics.auc)
        assert e["y_score"].dtype == np.float32
        np.testing.assert_array_equal(e["y_score"], noisy.astype(np.float32))

    other = make_key(seed=5)
    assert reg.evaluated([row.key, other, "f" * 64]) == {
        row.key.digest(): {("gaussian_noise", 3), ("pixelate", 1), ("pixelate", 5)},
        other.digest(): set(), "f" * 64: set()}
    assert reg.evaluations(other) == []

    # a refit replaces the model: its old corrupted scores go with the old row
    assert reg.add(row, y_score, y_true, replace=True)
    assert reg.evaluations(row.key) == [] and reg.evaluated([row.key]) == {
        row.key.digest(): set()}


def test_add_evaluation_refuses_what_cannot_be_right(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    row, y_score, y_true, metrics = _scored_row(make_key())
    with pytest.raises(RegistryError, match="add its clean row first"):
        reg.add_evaluation(row.key, "pixelate", 1, metrics, y_score)
    reg.add(row, y_score, y_true)
    with pytest.raises(InvalidArgumentError, match="one score row per test image"):
        reg.add_evaluation(row.key, "pixelate", 1, metrics, y_score[:-1])
    for bad in (0, 1.5, True):
        with pytest.raises(InvalidArgumentError, match="severity"):
            reg.add_evaluation(row.key, "pixelate", bad, metrics, y_score)
    with pytest.raises(InvalidArgumentError, match="corruption"):
        reg.add_evaluation(row.key, " ", 1, metrics, y_score)
    assert reg.evaluations(row.key) == []


def test_dataframe_and_cli_show_evaluations_only_when_asked(tmp_path, capsys):
    from medfm.cli import main

    reg = Registry.in_workdir(tmp_path / "work")
    first, second = (_scored_row(make_key(seed=s), seed=s) for s in (0, 1))
    for row, y_score, y_true, _ in (first, second):
        reg.add(row, y_score, y_true)
    row, y_score, y_true, _ = first
    worse = _scored_row(make_key(seed=0), seed=0, shift=1.5)[3]  # shifted scores: other numbers
    reg.add_evaluation(row.key, "jpeg_compression", 2, worse, y_score)
    reg.add_evaluation(row.key, "jpeg_compression", 1, worse, y_score)

    clean = reg.to_dataframe()
    assert len(clean) == 2 and clean["corruption"].isna().all() and clean["severity"].isna().all()
    frame = reg.to_dataframe(corruptions=True)
    assert list(frame.columns) == list(DATAFRAME_COLUMNS)
    shown = [(d[:8], c, None if s is pd_na() else s)
             for d, c, s in zip(frame["digest"], frame["corruption"], frame["severity"],
                                strict=True)]
    ours, theirs = row.key.digest()[:8], second[0].key.digest()[:8]
    assert shown == [(ours, None, None), (ours, "jpeg_compression", 1),
                     (ours, "jpeg_compression", 2), (theirs, None, None)]
    assert frame["ece"].iloc[1] == worse.ece and frame["ece"].iloc[0] == first[3].ece
    assert frame["seed"].iloc[2] == 0 and frame["n_train"].iloc[2] == 54  # the run's key fields
    assert len(reg.to_dataframe(corruptions=True, seed=1)) == 1

    workdir = ["--workdir", str(tmp_path / "work")]
    assert main(["results", "--format", "json", *workdir]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all(r["corruption"] is None and r["severity"] is None for r in rows)
    assert {"ece", "brier", "nll", "ece_ci_low", "nll_ci_high"} <= set(rows[0])
    assert rows[0]["ece"] == pytest.approx(first[3].ece)
    assert main(["results", "--format", "json", "--corruptions", *workdir]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["corruption"], r["severity"]) for r in rows] == [
        (None, None), ("jpeg_compression", 1), ("jpeg_compression", 2), (None, None)]
    assert main(["results", "--corruptions", *workdir]) == 0
    table = capsys.readouterr().out
    assert "corruption" in table and "jpeg_compression" in table and "ece" in table
    assert main(["results", *workdir]) == 0
    assert "corruption" not in capsys.readouterr().out


def pd_na():
    import pandas as pd

    return pd.NA
