"""SimpleShot and few-shot episodes (issue 30) on real BreastMNIST features (the pretrained
Lite0 and a random tiny ViT) and small synthetic stores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from medfm.cli import main
from medfm.data import Task
from medfm.episodes import episode_summary, load_episodes
from medfm.extract import extract
from medfm.probe import probe
from medfm.sampling import SubsetSpec, expand_episodes, indices_digest, sample
from medfm.store.features import find_stores
from medfm.store.registry import Registry
from tests.test_probe import write_store

BACKBONES = ("tf_efficientnet_lite0.in1k", "test_vit")


@pytest.fixture(scope="module")
def breast(real_root, tmp_path_factory):
    """A work directory with two real BreastMNIST-28 stores: ImageNet Lite0 and a random ViT."""
    workdir = tmp_path_factory.mktemp("breast-fewshot")
    extract(dataset="breastmnist", size=28, backbone=BACKBONES[0], resize_policy="native",
            data_root=real_root, workdir=workdir, progress=False)
    extract(dataset="breastmnist", size=28, backbone=BACKBONES[1], weights="random",
            data_root=real_root, workdir=workdir, progress=False)
    return workdir


def _store(workdir, backbone: str):
    (store,) = [s for s in find_stores(workdir) if s.request["backbone"].startswith(backbone)]
    return store


def _one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- SimpleShot --------------------------------------------------------------------------------

def _nearest_centroid(train: np.ndarray, y: np.ndarray, test: np.ndarray, norm: str):
    """An independent nearest-centroid classifier (numpy, float64): predictions and distances."""
    train, test = train.astype(np.float64), test.astype(np.float64)
    if norm == "cl2n":
        centre = train.mean(axis=0)
        train, test = train - centre, test - centre
    if norm in ("cl2n", "l2n"):
        train = train / np.linalg.norm(train, axis=1, keepdims=True)
        test = test / np.linalg.norm(test, axis=1, keepdims=True)
    classes = np.unique(y)
    centroids = np.stack([train[y == c].mean(axis=0) for c in classes])
    distances = np.stack([((test - c) ** 2).sum(axis=1) for c in centroids], axis=1)
    return classes[distances.argmin(axis=1)], distances


@pytest.mark.parametrize("norm", ["cl2n", "un"])
def test_simpleshot_is_the_nearest_centroid_prediction_for_prediction(breast, norm):
    store = _store(breast, BACKBONES[0])
    report = probe(store=store.path, method="simpleshot", simpleshot_norm=norm,
                   fractions=[0.1, 1.0], shots=[5], seeds=[0, 1], workdir=breast,
                   progress=False)
    assert len(report.computed) == 6
    with h5py.File(store.path) as fh:  # the stored float16 features, read without medfm
        X = {s: fh[f"{s}/features"][:].astype(np.float32) for s in ("train", "test")}
        y = {s: fh[f"{s}/labels"][:, 0] for s in ("train", "test")}
    registry = Registry.in_workdir(breast)
    for row in report.computed:
        assert row.key.method == "simpleshot" and json.loads(row.key.params) == {"norm": norm}
        spec = SubsetSpec(fraction=row.key.fraction, shots=row.key.shots, seed=row.key.seed)
        rows = sample(y["train"][:, None], Task.BINARY, spec).indices
        assert row.subset_digest == indices_digest(rows) and row.n_train == len(rows)
        expected, distances = _nearest_centroid(X["train"][rows], y["train"][rows], X["test"],
                                                norm)
        y_true, scores = registry.scores(row.key)
        np.testing.assert_array_equal(scores.argmax(axis=1), expected)
        softmax = np.exp(-distances - (-distances).max(axis=1, keepdims=True))
        np.testing.assert_allclose(scores, softmax / softmax.sum(axis=1, keepdims=True),
                                   atol=1e-6)
        assert row.acc == pytest.approx(np.mean(expected == y_true.ravel()))
    full = [r for r in report.computed if r.key.fraction == 1.0]
    assert all(r.acc > 0.6 for r in full)  # ImageNet features separate BreastMNIST somewhat


# -- episodes ----------------------------------------------------------------------------------

def test_episodes_are_the_same_for_every_method_backbone_and_process(breast, real_root):
    rows = []
    for method in ("simpleshot", "knn"):
        for backbone in BACKBONES:
            rows += probe(dataset="breastmnist", backbone=backbone, method=method, shots=[2],
                          episodes=4, seeds=[0, 1], workdir=breast, progress=False).computed
    assert len(rows) == 2 * 2 * 2 * 4
    by_episode: dict = {}
    for row in rows:
        params = json.loads(row.key.params)
        assert row.n_train == 4 and row.key.shots == 2 and "ways" not in params
        by_episode.setdefault((row.key.seed, params["episode"]), set()).add(row.subset_digest)
    assert all(len(d) == 1 for d in by_episode.values())  # every method and backbone: one set
    digests = {k: next(iter(d)) for k, d in by_episode.items()}
    assert len(set(digests.values())) == 8  # episodes differ, and seeds differ
    # another process draws the same episodes from the labels
    code = ("import sys, numpy as np; from medfm.data import Task, load_split; "
            "from medfm.sampling import SubsetSpec, sample; "
            "_, y = load_split('breastmnist', 28, 'train'); "
            "print(*[sample(y, Task.BINARY, SubsetSpec(shots=2, seed=s, episode=e)).digest "
            "for s in (0, 1) for e in range(4)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "MEDFM_DATA_ROOT": str(real_root)}
                         ).stdout.split()
    assert out == [digests[(s, e)] for s in (0, 1) for e in range(4)]


def test_episode_keys_leave_every_other_key_unchanged(breast):
    from medfm.resolve.probe import resolve_probe

    store = _store(breast, BACKBONES[0])
    request = resolve_probe("simpleshot")
    plain = request.key(store, SubsetSpec(shots=2, seed=0))
    episode = request.key(store, SubsetSpec(shots=2, seed=0, episode=0))
    assert json.loads(plain.params) == {"norm": "cl2n"}
    assert json.loads(episode.params) == {"norm": "cl2n", "episode": 0}
    assert plain.digest() != episode.digest()


def test_exported_episodes_load_back_identically_and_rerun_nothing(breast, real_root,
                                                                    tmp_path, capsys):
    path = tmp_path / "episodes.json"
    assert main(["episodes", "export", "--dataset", "breastmnist", "--shots", "1,3",
                 "--episodes", "3", "--seeds", "0,1", "--data-root", str(real_root),
                 "--out", str(path)]) == 0
    store = _store(breast, BACKBONES[0])
    labels = store.labels("train")
    specs = load_episodes(path, dataset="breastmnist", data_digest=store.request["data_digest"],
                          labels=labels, task=Task.BINARY)
    assert specs == expand_episodes([1, 3], [0, 1], 3)  # medfm's own draws, not rows
    document = json.loads(path.read_text())
    for spec, ep in zip(specs, document["episodes"], strict=True):
        assert sample(labels, Task.BINARY, spec).indices.tolist() == ep["rows"]
    work = ["--workdir", str(breast), "--quiet", "--backbone", BACKBONES[0]]
    assert main(["probe", "--method", "simpleshot", "--shots", "1,3", "--episodes", "3",
                 "--seeds", "0,1", *work]) == 0
    capsys.readouterr()
    assert main(["probe", "--method", "simpleshot", "--episode-file", str(path), *work]) == 0
    out = capsys.readouterr().out
    assert "0 run(s) fitted, 12 already in the registry" in out
    assert "mean over episodes" in out
    assert main(["results", "--workdir", str(breast), "--method", "simpleshot"]) == 0
    summary = capsys.readouterr().out.split("mean over episodes")[1]
    assert "simpleshot  1      2      6" in summary and "simpleshot  3      2      6" in summary

    # another lab's rows (a valid file, not medfm's draw): evaluated on exactly those rows
    other = [int(i) for i in np.flatnonzero(labels[:, 0] == 0)[:2]] + \
        [int(i) for i in np.flatnonzero(labels[:, 0] == 1)[-2:]]
    theirs = {**document, "episodes": [{"seed": 7, "shots": 2, "ways": None, "episode": 0,
                                        "rows": other, "digest": indices_digest(sorted(other))}]}
    path.write_text(json.dumps(theirs))
    (row,) = probe(store=store.path, method="simpleshot", episode_file=path, workdir=breast,
                   progress=False).computed
    assert row.subset_digest == indices_digest(sorted(other)) and row.n_train == 4
    assert json.loads(row.key.params)["episode_rows"] == row.subset_digest

    theirs["episodes"][0]["rows"] = other[:3]  # edited after its digest was written
    path.write_text(json.dumps(theirs))
    err = _one_line_error(["probe", "--method", "simpleshot", "--episode-file", str(path),
                           *work], capsys)
    assert "does not match its digest" in err


def test_episode_file_of_another_dataset_is_refused(breast, tmp_path, capsys):
    path = tmp_path / "episodes.json"
    path.write_text(json.dumps({"format": "medfm-episodes/1", "dataset": "pneumoniamnist",
                                "data_digest": "x", "n_train": 4708, "episodes": [
                                    {"seed": 0, "shots": 1, "episode": 0, "rows": [0, 1],
                                     "digest": indices_digest([0, 1])}]}))
    err = _one_line_error(["probe", "--method", "knn", "--episode-file", str(path),
                           "--workdir", str(breast), "--backbone", BACKBONES[0]], capsys)
    assert "is for pneumoniamnist" in err


def _synthetic_store(workdir, flag: str):
    """test_probe's synthetic store of `flag` (features that carry the labels); its path."""
    write_store(workdir, flag)
    (store,) = find_stores(workdir, dataset=flag)
    return store.path


def test_multi_label_episodes_and_simpleshot_are_one_line(tmp_path, capsys):
    work = tmp_path / "w"
    _synthetic_store(work, "chestmnist")
    err = _one_line_error(["probe", "--method", "knn", "--shots", "2", "--episodes", "2",
                           "--workdir", str(work)], capsys)
    assert "multi-label" in err and "--fractions" in err
    err = _one_line_error(["probe", "--method", "simpleshot", "--fractions", "0.5",
                           "--workdir", str(work), "--quiet"], capsys)
    assert "SimpleShot" in err and "multi-label" in err
    assert Registry.in_workdir(work).to_dataframe().empty  # nothing half-recorded


def test_ways_fit_and_score_only_the_episode_classes(tmp_path):
    work = tmp_path / "w"
    path = _synthetic_store(work, "organamnist")  # 11 classes
    report = probe(store=path, method="simpleshot", shots=[3], episodes=4, ways=3, seeds=[0],
                   workdir=work, progress=False)
    registry = Registry.in_workdir(work)
    test_labels = _labels(path, "test")
    seen = set()
    for row in report.computed:
        assert row.n_train == 9 and json.loads(row.key.params)["ways"] == 3
        y_true, scores = registry.scores(row.key)
        classes = np.unique(_labels(path, "train")[sample(_labels(path, "train"),
                                                           Task.MULTI_CLASS, SubsetSpec(
            shots=3, seed=0, episode=json.loads(row.key.params)["episode"], ways=3)).indices])
        assert scores.shape == (np.isin(test_labels, classes).sum(), 3)
        assert set(np.unique(y_true)) == {0, 1, 2}
        seen.add(tuple(classes))
        assert row.acc > 0.8  # well-separated synthetic classes
    assert len(seen) > 1  # episodes draw different classes


def _labels(path, split: str) -> np.ndarray:
    with h5py.File(path) as fh:
        return fh[f"{split}/labels"][:, 0]


def test_summary_is_the_mean_and_95_interval_over_episodes(tmp_path):
    work = tmp_path / "w"
    path = _synthetic_store(work, "bloodmnist")
    probe(store=path, method="simpleshot", shots=[1], episodes=6, seeds=[0, 1], workdir=work,
          progress=False)
    frame = Registry.in_workdir(work).to_dataframe()
    (row,) = episode_summary(frame).to_dict("records")
    acc = frame["acc"].to_numpy()
    half = 1.959963984540054 * acc.std(ddof=1) / math.sqrt(12)
    assert row["episodes"] == 12 and row["seeds"] == 2
    assert row["acc"] == pytest.approx(acc.mean())
    assert (row["acc_low"], row["acc_high"]) == pytest.approx((acc.mean() - half,
                                                               acc.mean() + half))


def test_episodes_need_shots_and_stay_bounded(tmp_path, capsys):
    work = tmp_path / "w"
    _synthetic_store(work, "bloodmnist")
    base = ["probe", "--method", "simpleshot", "--workdir", str(work)]
    assert "--shots" in _one_line_error([*base, "--fractions", "0.5", "--episodes", "3"], capsys)
    assert "--episodes" in _one_line_error([*base, "--shots", "1", "--ways", "3"], capsys)
    assert "10,000" in _one_line_error([*base, "--shots", "1", "--episodes", "20000"], capsys)
    assert "more classes" in _one_line_error([*base, "--shots", "1", "--episodes", "1",
                                              "--ways", "9"], capsys)
