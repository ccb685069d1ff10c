"""Result bundles: export, merge, checksums, format versions, conflicts; `medfm --version`.

Run: .venv/bin/python -m pytest tests/test_bundle.py -q

The source work directory holds real kNN probe rows (per-sample scores, store provenance) on
real BreastMNIST and PneumoniaMNIST and two synthetic datasets (tests/ranked_workdir.py), plus
one corrupted evaluation; every check goes through the CLI and compares registries by what
`medfm results --format json` prints.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import tarfile

import numpy as np
import pytest

from medfm.cli import main
from medfm.data import get_dataset
from medfm.metrics import evaluate
from medfm.report.leaderboard import leaderboard
from medfm.store.bundle import BUNDLE_VERSION, DATABASE, MANIFEST, MANIFEST_SUM
from medfm.store.registry import Registry
from tests.ranked_workdir import DATASETS, REAL


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def results_json(capsys, workdir, *extra) -> list[dict]:
    code, out, err = run_cli(capsys, "results", "--workdir", workdir, "--format", "json", *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def source(ranked_workdir, tmp_path_factory):
    """A copy of the ranked work directory with one corrupted evaluation added."""
    work = tmp_path_factory.mktemp("bundle-source") / "work"
    shutil.copytree(ranked_workdir, work)
    registry = Registry.in_workdir(work)
    row = registry.query(dataset="breastmnist")[0]
    y_true, y_score = registry.scores(row.key)
    noisy = np.clip(y_score + np.random.default_rng(0).normal(0, 0.2, y_score.shape), 0, 1)
    task = get_dataset("breastmnist").task
    assert registry.add_evaluation(row.key, "pixelate", 3, evaluate(y_true, noisy, task), noisy)
    registry.close()
    return work


@pytest.fixture(scope="module")
def bundle(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("bundles") / "lab-a.medfm"
    assert main(["export", str(path), "--workdir", str(source)]) == 0
    return path


def members(path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x01]))


def test_export_then_merge_into_an_empty_workdir_gives_the_same_results(source, bundle, capsys,
                                                                        tmp_path):
    target = tmp_path / "empty"
    code, out, err = run_cli(capsys, "merge", bundle, "--workdir", target)
    n_rows = len(Registry.in_workdir(source))
    assert code == 0, err
    assert f"{n_rows} row(s) added (1 corrupted evaluation(s)" in out
    assert results_json(capsys, target) == results_json(capsys, source)
    assert (results_json(capsys, target, "--corruptions")
            == results_json(capsys, source, "--corruptions"))
    merged, original = Registry.in_workdir(target), Registry.in_workdir(source)
    for row in original.query(dataset=list(REAL)):
        for ours, theirs in zip(merged.scores(row.key), original.scores(row.key), strict=True):
            np.testing.assert_array_equal(ours, theirs)  # per-sample scores, bit for bit
    # the manifest and the store provenance are kept beside the registry
    (record,) = (target / "bundles").iterdir()
    stores = json.loads((record / "stores.json").read_text())
    fingerprints = {r.key.store_fingerprint for r in original.query()}
    assert {s["fingerprint"] for s in stores} == fingerprints and len(stores) == 15
    assert all(json.loads(s["attrs"]["request_json"])["dataset"] in DATASETS for s in stores)
    manifest = json.loads((record / MANIFEST).read_text())
    assert manifest["counts"] == {"results": n_rows, "scores": n_rows, "evaluations": 1,
                                  "stores": 15}


def test_merging_twice_adds_nothing(bundle, capsys, tmp_path):
    target = tmp_path / "w"
    code, out, _ = run_cli(capsys, "merge", bundle, "--workdir", target, "--dry-run")
    assert code == 0 and "(1 corrupted evaluation(s)" in out and "0 already here" in out
    assert not target.exists()  # a dry run creates nothing
    assert run_cli(capsys, "merge", bundle, "--workdir", target)[0] == 0
    before = results_json(capsys, target, "--corruptions")
    code, out, _ = run_cli(capsys, "merge", bundle, "--workdir", target)
    assert code == 0 and out.startswith(f"bundle {members_id(bundle)}: 0 row(s) added (0 ")
    assert f"{len(before) - 1} already here" in out
    assert results_json(capsys, target, "--corruptions") == before


def members_id(path) -> str:
    with tarfile.open(path) as tar:
        return hashlib.sha256(tar.extractfile(MANIFEST).read()).hexdigest()[:16]


def score_offset(bundle) -> float:
    """Where, as a share of the database member, a stored per-sample score lies: a byte there
    is a value SQLite's own checks cannot tell from any other (only the checksum can)."""
    with tarfile.open(bundle) as tar:
        database = tar.extractfile(DATABASE).read()
    return (database.index(b"\x93NUMPY", len(database) // 2) + NPY_HEADER + 9) / len(database)


NPY_HEADER = 128  # bytes of a .npy header: what follows is the array's data


@pytest.mark.parametrize("member, where", [(DATABASE, "score"), (DATABASE, 0.5),
                                           (DATABASE, 0.0), (MANIFEST, 0.3),
                                           (MANIFEST_SUM, 0.2)])
def test_a_flipped_byte_is_one_line_and_nothing_is_merged(bundle, source, capsys, tmp_path,
                                                          member, where):
    damaged = tmp_path / "damaged.medfm"
    shutil.copy(bundle, damaged)
    info = members(damaged)[member]
    share = score_offset(bundle) if where == "score" else where
    flip_byte(damaged, info.offset_data + int(info.size * share))
    # into an empty work directory: nothing is created
    code, out, err = run_cli(capsys, "merge", damaged, "--workdir", tmp_path / "empty")
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert err.startswith("medfm merge: error: ") and "Traceback" not in err
    assert not (tmp_path / "empty").exists()
    # into a work directory with a registry: the registry is unchanged
    target = tmp_path / "kept"
    shutil.copytree(source, target)
    before = results_json(capsys, target, "--corruptions")
    code, _, err = run_cli(capsys, "merge", damaged, "--workdir", target)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert results_json(capsys, target, "--corruptions") == before
    assert not (target / "bundles").exists()


def repack(bundle, path, edit) -> None:
    """`bundle` rewritten to `path` with its manifest passed through `edit` (sums recomputed)."""
    with tarfile.open(bundle) as tar:
        manifest = json.loads(tar.extractfile(MANIFEST).read())
        database = tar.extractfile(DATABASE).read()
    data = json.dumps(edit(manifest)).encode()
    with tarfile.open(path, "w") as tar:
        for name, payload in ((MANIFEST, data),
                              (MANIFEST_SUM, hashlib.sha256(data).hexdigest().encode()),
                              (DATABASE, database)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_a_newer_format_is_refused_with_one_line(bundle, capsys, tmp_path):
    newer = tmp_path / "newer.medfm"
    repack(bundle, newer, lambda m: {**m, "format_version": BUNDLE_VERSION + 1,
                                     "versions": {**m["versions"], "medfm": "9.0"}})
    code, _, err = run_cli(capsys, "merge", newer, "--workdir", tmp_path / "w")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"format version {BUNDLE_VERSION + 1}, newer than this medfm reads" in err
    assert "medfm 9.0" in err and not (tmp_path / "w").exists()
    lacking = tmp_path / "lacking.medfm"  # a manifest (with a valid sum) missing a field
    repack(bundle, lacking, lambda m: {**m, "files": {DATABASE: {"bytes": 1}}})
    code, _, err = run_cli(capsys, "merge", lacking, "--workdir", tmp_path / "w")
    assert code == 2 and "not a readable medfm bundle" in err and len(err.splitlines()) == 1
    same = tmp_path / "same.medfm"  # the repacking itself keeps a bundle mergeable
    repack(bundle, same, lambda m: m)
    assert run_cli(capsys, "merge", same, "--workdir", tmp_path / "w")[0] == 0


def test_rows_that_disagree_are_reported_and_kept_apart(source, capsys, tmp_path):
    lab_b = tmp_path / "lab-b"
    shutil.copytree(source, lab_b)
    digest = Registry.in_workdir(source).query(dataset="pneumoniamnist")[0].key.digest()
    with sqlite3.connect(lab_b / "registry.sqlite") as conn:
        conn.execute("UPDATE results SET acc = acc + 0.01 WHERE digest = ?", (digest,))
    conn.close()
    bundle_b = tmp_path / "lab-b.medfm"
    assert run_cli(capsys, "export", bundle_b, "--workdir", lab_b)[0] == 0
    target = tmp_path / "target"
    shutil.copytree(source, target)
    before = results_json(capsys, target)
    code, out, err = run_cli(capsys, "merge", bundle_b, "--workdir", target, "--dry-run")
    assert code == 0 and "dry run: nothing written" in out and "1 row(s) disagree" in out, err
    assert f"{len(before) - 1} already here" in out and "0 row(s) to add" in out
    assert not (target / "conflicts").exists() and not (target / "bundles").exists()
    for _ in range(2):  # a second merge reports it again and keeps it apart once
        code, out, err = run_cli(capsys, "merge", bundle_b, "--workdir", target)
        assert code == 0, err
        assert "0 row(s) added" in out and "1 row(s) disagree" in out
        assert f"{digest[:12]} pneumoniamnist@28" in out and "acc" in out
    assert results_json(capsys, target) == before  # the registry's row is kept
    apart = target / "conflicts" / members_id(bundle_b)
    (kept,) = results_json(capsys, apart)
    original = next(r for r in before if r["digest"] == digest)
    assert kept["digest"] == digest and kept["acc"] == pytest.approx(original["acc"] + 0.01)


def test_leaderboard_over_merged_registries_equals_one_over_all_rows(source, capsys, tmp_path):
    halves = [",".join(DATASETS[:2]), ",".join(DATASETS[2:])]
    target = tmp_path / "merged"
    for i, datasets in enumerate(halves):
        part = tmp_path / f"part{i}.medfm"
        assert run_cli(capsys, "export", part, "--workdir", source, "--dataset", datasets)[0] == 0
        assert run_cli(capsys, "merge", part, "--workdir", target)[0] == 0
    merged = leaderboard(workdir=target, diagrams=False).to_dict()
    whole = leaderboard(workdir=source, diagrams=False).to_dict()
    assert merged == whole and len(whole["blocks"]) == 2
    assert all(b["test"]["p_value"] is not None for b in merged["blocks"])


def test_version_prints_what_a_bundle_records(bundle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    printed = dict(line.split(" ", 1) for line in lines)
    with tarfile.open(bundle) as tar:
        recorded = json.loads(tar.extractfile(MANIFEST).read())["versions"]
    assert printed == recorded
    assert lines[0] == f"medfm {__import__('medfm').__version__}"
    assert {"torch", "timm", "medmnist", "scikit-learn"} <= set(printed)


def test_export_errors_are_one_line(source, bundle, capsys, tmp_path):
    cases = [
        (["export", bundle, "--workdir", source], "already exists"),
        (["export", tmp_path / "x.medfm", "--workdir", source, "--dataset", "dermamnist"],
         "no results in"),
        (["export", tmp_path / "y.medfm", "--workdir", tmp_path / "nowhere"],
         "no results registry"),
    ]
    not_a_bundle = tmp_path / "notes.txt"
    not_a_bundle.write_text("hello")
    cases.append((["merge", not_a_bundle, "--workdir", tmp_path / "w"], "not a readable"))
    for argv, says in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "x.medfm").exists() and not (tmp_path / "w").exists()
    assert run_cli(capsys, "export", bundle, "--workdir", source, "--force")[0] == 0


def test_an_old_workdir_exports_and_merges_with_nothing_recomputed(capsys, tmp_path,
                                                                   monkeypatch):
    """A work directory of the first layout (registry schema 1): export upgrades its registry
    as any open does, and the bundle merges to the same rows, scores and store provenance."""
    from tests.test_migrate import FIXTURE, _refuse

    old = tmp_path / "old"
    shutil.copytree(FIXTURE, old, ignore=shutil.ignore_patterns("README.md"))
    for target in ("medfm.extract.extractor.create_backbone", "medfm.finetune.run.create_backbone",
                   "medfm.finetune.run.load_split", "medfm.probe.run.StoreArrays.load"):
        monkeypatch.setattr(target, _refuse)  # nothing may be recomputed
    code, out, err = run_cli(capsys, "export", tmp_path / "old.medfm", "--workdir", old)
    assert code == 0, err
    assert "6 row(s), 6 with per-sample scores" in out and "1 store provenance" in out
    assert run_cli(capsys, "merge", tmp_path / "old.medfm", "--workdir", tmp_path / "new")[0] == 0
    assert results_json(capsys, tmp_path / "new") == results_json(capsys, old)


def test_every_flipped_byte_is_refused_or_changes_nothing(bundle, tmp_path):
    """300 seeded single-bit flips anywhere in a bundle: each is one BundleError, or lands in
    the tar's padding and the bundle reads to the same manifest and database bytes."""
    from medfm.errors import BundleError
    from medfm.store.bundle import read_bundle

    data = bundle.read_bytes()
    clean = tmp_path / "clean"
    clean.mkdir()
    manifest, _, database = read_bundle(bundle, clean)
    expected = hashlib.sha256(database.read_bytes()).hexdigest()
    rng = np.random.default_rng(0)
    refused = 0
    for i, (offset, bit) in enumerate(zip(rng.integers(0, len(data), 300),
                                          rng.integers(0, 8, 300), strict=True)):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << int(bit)
        path, out = tmp_path / "flipped.medfm", tmp_path / f"out{i}"
        path.write_bytes(bytes(flipped))
        out.mkdir()
        try:
            got, _, db = read_bundle(path, out)
        except BundleError:
            refused += 1
            continue
        assert got == manifest and hashlib.sha256(db.read_bytes()).hexdigest() == expected
        shutil.rmtree(out)
    assert refused > 250  # the payload is nearly all of the file


def test_a_read_only_registry_exports_and_ranks(source, capsys, tmp_path, monkeypatch):
    """A lab's shared results on a read-only mount (real EROFS, as root too): export reads it,
    the leaderboard draws elsewhere, and the bundle merges to the same rows."""
    from tests.test_bad_inputs import _medfm, _namespace_or_skip

    prefix = _namespace_or_skip()
    shared = tmp_path / "shared"
    shutil.copytree(source, shared)
    monkeypatch.setenv("MOUNT", f"mount --bind {shared} {shared} && "
                                f"mount -o remount,bind,ro {shared}")
    done = _medfm("export", str(tmp_path / "ro.medfm"), "--workdir", str(shared), prefix=prefix)
    assert done.returncode == 0, done.stderr
    done = _medfm("leaderboard", "--workdir", str(shared), "--out", str(tmp_path / "cd"),
                  "--format", "json", prefix=prefix)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "cd").glob("*.svg"))) == 2
    assert run_cli(capsys, "merge", tmp_path / "ro.medfm", "--workdir", tmp_path / "w")[0] == 0
    assert results_json(capsys, tmp_path / "w", "--corruptions") == results_json(
        capsys, source, "--corruptions")
