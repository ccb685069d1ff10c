"""Issue 12: MedMNIST-C corrupted test splits (medmnistc), embedded once, and every probe scored
on them without refitting. Real BreastMNIST images; a tiny random backbone for speed."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

pytest.importorskip("medmnistc.corruptions.registry", exc_type=ImportError,  # wand's too
                    reason="robustness needs medmnistc and ImageMagick (the robustness extra)")

from medfm.cli import main  # noqa: E402
from medfm.robust.corrupt import corrupt, resolve_corruptions  # noqa: E402
from medfm.errors import StoreError  # noqa: E402
from medfm.extract.extractor import extract_corrupted  # noqa: E402
from medfm.preprocess import PreprocessRequest  # noqa: E402
from medfm.probe import probe  # noqa: E402
from medfm.probe.methods.logreg import LogisticProbe  # noqa: E402
from medfm.robust.score import state_path  # noqa: E402
from medfm.resolve.store import resolve_store_request  # noqa: E402
from medfm.robust.stores import available_pairs  # noqa: E402
from medfm.store.features import FeatureStore, find_stores  # noqa: E402
from medfm.store.registry import Registry  # noqa: E402

PAIRS = ("pixelate", "speckle_noise", "brightness_down")


@pytest.fixture(scope="module")
def breast_test(real_root):
    with np.load(real_root / "breastmnist.npz") as npz:
        return npz["test_images"]


def _request(real_root):
    return resolve_store_request(dataset="breastmnist", size=28, backbone="test_resnet",
                                 weights="random", data_root=real_root,
                                 preprocess=PreprocessRequest(input_size=32))


def test_corrupted_images_are_deterministic_under_a_seed_and_any_chunking(breast_test):
    images = breast_test[:20]
    a = corrupt(images, "breastmnist", "speckle_noise", 5, seed=0)
    b = corrupt(images, "breastmnist", "speckle_noise", 5, seed=0)
    np.testing.assert_array_equal(a, b)
    chunked = np.concatenate([corrupt(images[:7], "breastmnist", "speckle_noise", 5, seed=0),
                              corrupt(images[7:], "breastmnist", "speckle_noise", 5, seed=0,
                                      start=7)])
    np.testing.assert_array_equal(a, chunked)
    other = corrupt(images, "breastmnist", "speckle_noise", 5, seed=1)
    assert not np.array_equal(a, other)
    assert a.shape == images.shape and a.dtype == np.uint8
    mild = corrupt(images, "breastmnist", "speckle_noise", 1, seed=0).astype(int)
    strong = a.astype(int)
    assert np.abs(strong - images).mean() > np.abs(mild - images).mean() > 0
    state = np.random.get_state()[1].copy()
    corrupt(images[:2], "breastmnist", "motion_blur", 3, seed=0)  # package draws globally
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # caller's state restored


def test_medmnist_c_names_every_corruption_of_the_dataset():
    pairs = resolve_corruptions("breastmnist", "medmnist-c", (1, 5))
    assert {c for c, _ in pairs} == {"pixelate", "jpeg_compression", "speckle_noise",
                                     "motion_blur", "brightness_up", "brightness_down",
                                     "contrast_down"}
    assert len(pairs) == 14
    with pytest.raises(Exception, match="not defined for breastmnist"):
        resolve_corruptions("breastmnist", "bubble", (1,))


def test_probes_are_scored_on_corrupted_splits_and_later_ones_without_refitting(
        real_root, tmp_path, monkeypatch):
    work = tmp_path / "work"
    request = _request(real_root)
    first = extract_corrupted(request, corruptions=",".join(PAIRS[:2]), severities=(1, 5),
                              workdir=work, progress=False)
    assert first.status == "built" and len(first.pairs) == 4
    again = extract_corrupted(request, corruptions=",".join(PAIRS[:2]), severities=(1, 5),
                              workdir=work, progress=False)
    assert again.status == "exists"
    report = probe(dataset="breastmnist", fractions=(0.3,), seeds=(0,), workdir=work,
                   progress=False)
    (row,) = report.computed
    registry = Registry.in_workdir(work)
    evaluations = registry.evaluations(row.key)
    assert {(e["corruption"], e["severity"]) for e in evaluations} == {
        ("pixelate", 1), ("pixelate", 5), ("speckle_noise", 1), ("speckle_noise", 5)}
    assert all(e["y_score"].shape == (156, 2) for e in evaluations)
    assert state_path(work, row.key.digest()).exists()

    # a corruption added later scores the recorded run from its kept state: no fit at all
    extract_corrupted(request, corruptions=PAIRS[2], severities=(3,), workdir=work,
                      progress=False)

    def no_fit(*args, **kwargs):
        raise AssertionError("a recorded probe was refitted")

    monkeypatch.setattr(LogisticProbe, "fit", no_fit)
    later = probe(dataset="breastmnist", fractions=(0.3,), seeds=(0,), workdir=work,
                  progress=False)
    assert later.computed == [] and later.corrupted_filled == 1
    assert ("brightness_down", 3) in {(e["corruption"], e["severity"])
                                      for e in registry.evaluations(row.key)}
    # and the scores equal the fitted model's on those features
    store = find_stores(work, dataset="breastmnist")[0]
    sibling = available_pairs(store)[("brightness_down", 3)]
    from medfm.probe.methods.logreg import _load_state
    from medfm.robust.score import load_state

    model = _load_state(load_state(work, row.key.digest()))
    expected = model.predict_proba(sibling.features("brightness_down", 3)).astype(np.float32)
    stored = next(e for e in registry.evaluations(row.key)
                  if (e["corruption"], e["severity"]) == ("brightness_down", 3))
    np.testing.assert_array_equal(stored["y_score"], expected)
    assert probe(dataset="breastmnist", fractions=(0.3,), seeds=(0,), workdir=work,
                 progress=False).corrupted_filled == 0


def test_a_run_recorded_before_its_state_was_kept_is_refitted_once(real_root, tmp_path):
    work = tmp_path / "work"
    request = _request(real_root)
    extract_corrupted(request, corruptions="pixelate", severities=(5,), workdir=work,
                      progress=False)
    store = find_stores(work, dataset="breastmnist")[0]
    sibling_dir = store.path.parent / "corrupted"
    hidden = tmp_path / "hidden"
    sibling_dir.rename(hidden)  # probe first without corrupted splits
    (row,) = probe(dataset="breastmnist", fractions=(0.3,), seeds=(0,), workdir=work,
                   progress=False).computed
    state_path(work, row.key.digest()).unlink()  # as a row recorded before this feature
    hidden.rename(sibling_dir)
    registry = Registry.in_workdir(work)
    before = registry.get(row.key)
    report = probe(dataset="breastmnist", fractions=(0.3,), seeds=(0,), workdir=work,
                   progress=False)
    assert report.corrupted_filled == 1 and report.computed == []
    assert registry.get(row.key) == before  # the row is left as it was
    assert state_path(work, row.key.digest()).exists()  # kept now


def test_a_damaged_corrupted_store_is_one_line(real_root, tmp_path, capsys):
    work = tmp_path / "work"
    result = extract_corrupted(_request(real_root), corruptions="pixelate", severities=(5,),
                               workdir=work, progress=False)
    with h5py.File(result.path, "r+") as fh:
        fh["pixelate_s5"]["features"][0, 0] += 1
    with pytest.raises(StoreError, match="damaged"):
        available_pairs(FeatureStore(find_stores(work)[0].path))[("pixelate", 5)].features(
            "pixelate", 5)
    code = main(["probe", "--dataset", "breastmnist", "--fractions", "0.3", "--seeds", "0",
                 "--workdir", str(work), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "damaged" in err[0]


def test_extract_cli_with_corruptions(real_root, tmp_path, capsys):
    code = main(["extract", "--dataset", "breastmnist", "--size", "28", "--backbone",
                 "test_resnet", "--weights", "random", "--input-size", "32", "--data-root",
                 str(real_root), "--workdir", str(tmp_path), "--corruptions",
                 "pixelate,contrast_down", "--severities", "2..3", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "corrupted test splits (2 corruptions x 2 severities): built" in out
    assert main(["extract", "--dataset", "breastmnist", "--size", "28", "--backbone",
                 "test_resnet", "--weights", "random", "--input-size", "32", "--data-root",
                 str(real_root), "--workdir", str(tmp_path), "--corruptions", "bubble",
                 "--quiet"]) == 2
    assert "not defined for breastmnist" in capsys.readouterr().err


def test_finetunes_are_scored_on_the_corrupted_splits_of_their_data(real_root, tmp_path):
    """A fine-tune is scored on the corruptions extracted for its dataset file (the images are
    corrupted the same way), and a recorded one gets later corruptions from its best.pt."""
    from medfm.finetune import finetune

    work = tmp_path / "work"
    request = _request(real_root)
    extract_corrupted(request, corruptions="pixelate", severities=(5,), workdir=work,
                      progress=False)
    args = dict(backbones=["test_resnet"], sizes=[28], datasets=["breastmnist"],
                fractions=[0.3], seeds=[0], weights="random", data_root=real_root,
                workdir=work, progress=False, resize_policy="native",
                overrides={"epochs": 1, "batch_size": 64, "augment": False})
    report = finetune(**args)
    (row,) = report.ran
    registry = Registry.in_workdir(work)
    assert [(e["corruption"], e["severity"]) for e in registry.evaluations(row.key)] == [
        ("pixelate", 5)]
    extract_corrupted(request, corruptions="contrast_down", severities=(2,), workdir=work,
                      progress=False)
    again = finetune(**args)
    assert again.ran == () and again.corrupted_filled == 1
    assert {(e["corruption"], e["severity"]) for e in registry.evaluations(row.key)} == {
        ("pixelate", 5), ("contrast_down", 2)}


def test_an_unreadable_best_pt_is_named_when_it_keeps_a_run_from_corrupted_scoring(real_root,
                                                                                   tmp_path):
    """A planted best.pt used to skip the recorded run's corrupted scoring without a word."""
    import os
    import warnings

    from medfm.errors import MedfmWarning
    from medfm.finetune import finetune
    from medfm.finetune.run import BEST_WEIGHTS_NAME, checkpoint_folder

    work = tmp_path / "work"
    args = dict(backbones=["test_resnet"], sizes=[28], datasets=["breastmnist"],
                fractions=[0.3], seeds=[0], weights="random", data_root=real_root,
                workdir=work, progress=False, resize_policy="native",
                overrides={"epochs": 1, "batch_size": 64, "augment": False})
    (row,) = finetune(**args).ran
    (checkpoint_folder(work, row.key) / BEST_WEIGHTS_NAME).write_bytes(os.urandom(4096))
    extract_corrupted(_request(real_root), corruptions="pixelate", severities=(5,),
                      workdir=work, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = finetune(**args)
    said = [str(w.message) for w in caught if issubclass(w.category, MedfmWarning)]
    assert again.corrupted_filled == 0
    assert any(BEST_WEIGHTS_NAME in line and "1 corrupted split" in line for line in said), said


def test_an_imported_dataset_borrows_a_medmnist_corruption_set(real_root, tmp_path):
    """An imported collection has no MedMNIST-C set of its own: it names one with
    --corruption-base, and without it the error says so."""
    from PIL import Image

    from medfm.imported import import_dataset

    with np.load(real_root / "breastmnist.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    src = tmp_path / "src"
    for split in ("train", "val", "test"):
        for i, (image, label) in enumerate(zip(arrays[f"{split}_images"][:60],
                                               arrays[f"{split}_labels"][:60, 0], strict=True)):
            (src / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(src / split / str(label) / f"{i}.png")
    import_dataset("mine", src, sizes=(28,), data_root=tmp_path / "root", progress=False)
    request = resolve_store_request(dataset="mine", size=28, backbone="test_resnet",
                                    weights="random", data_root=tmp_path / "root",
                                    preprocess=PreprocessRequest(input_size=32))
    with pytest.raises(Exception, match="--corruption-base"):
        extract_corrupted(request, corruptions="pixelate", severities=(5,),
                          workdir=tmp_path / "work", progress=False)
    done = extract_corrupted(request, corruptions="pixelate", severities=(5,),
                             base="breastmnist", workdir=tmp_path / "work", progress=False)
    assert done.pairs == [("pixelate", 5)]
    (row,) = probe(dataset="mine", fractions=(1.0,), seeds=(0,), workdir=tmp_path / "work",
                   progress=False).computed
    assert [(e["corruption"], e["severity"]) for e in
            Registry.in_workdir(tmp_path / "work").evaluations(row.key)] == [("pixelate", 5)]
