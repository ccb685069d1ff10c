import hashlib

import numpy as np
import pytest

from medfm.cache import file_digest
from medfm.data import (
    DATASETS,
    SIZES,
    Task,
    data_file,
    get_dataset,
    load_split,
    resolve_dataset,
    resolve_datasets,
)
from medfm.errors import DataFileMissingError, InvalidArgumentError, UnknownDatasetError
from medfm.synthetic import write_synthetic_npz

from .conftest import SYNTHETIC_FLAGS


def test_registry_has_the_twelve_2d_datasets_with_medmnist_tasks():
    assert len(DATASETS) == 12
    assert get_dataset("ChestMNIST").task is Task.MULTI_LABEL
    assert get_dataset("chestmnist").n_classes == 14
    assert get_dataset("chestmnist").primary_metric == "auc"
    assert get_dataset("retinamnist").task is Task.ORDINAL
    assert get_dataset("breastmnist").task is Task.BINARY
    assert get_dataset("pathmnist").n_channels == 3
    assert get_dataset("pathmnist").n_samples == {"train": 89996, "val": 10004, "test": 7180}
    assert get_dataset("breastmnist").filename(28) == "breastmnist.npz"
    assert get_dataset("breastmnist").filename(224) == "breastmnist_224.npz"


def test_unknown_dataset_suggests_close_match():
    with pytest.raises(UnknownDatasetError, match="breastmnist"):
        get_dataset("breastmnst")


@pytest.mark.parametrize("bad", [32, "abc", 0])
def test_unpublished_size_is_a_clear_error(bad, synthetic_root):
    with pytest.raises(InvalidArgumentError, match="28, 64, 128, 224"):
        load_split("breastmnist", bad, "train", synthetic_root)


@pytest.mark.parametrize("flag", sorted(SYNTHETIC_FLAGS))
def test_load_split_shapes_for_every_task_type(flag, synthetic_root):
    info = get_dataset(flag)
    images, labels = load_split(flag, 28, "val", synthetic_root)
    assert images.dtype == np.uint8 and labels.dtype == np.uint8
    expected = (16, 28, 28, 3) if info.n_channels == 3 else (16, 28, 28)
    assert images.shape == expected
    assert labels.shape == ((16, 14) if info.task is Task.MULTI_LABEL else (16, 1))


def test_large_sizes_are_memory_mapped_and_equal_to_full_load(synthetic_root, tmp_path):
    mapped, _ = load_split("breastmnist", 128, "train", synthetic_root)
    full, _ = load_split("breastmnist", 128, "train", synthetic_root, mmap=False)
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, full)


def test_compressed_official_npz_is_streamed_to_a_cache_and_mapped(real_root, tmp_path):
    mapped, _ = load_split("breastmnist", 64, "test", real_root, mmap=True)
    full, _ = load_split("breastmnist", 64, "test", real_root, mmap=False)
    assert isinstance(mapped, np.memmap)
    assert mapped.shape == (156, 64, 64)
    np.testing.assert_array_equal(mapped, full)
    # the cache went to $MEDFM_NPY_CACHE, never into the (read-only) data folder
    assert list((tmp_path / "npy-cache").rglob("test_images.npy"))
    assert not (real_root / ".medfm-npy").exists()


def test_real_files_resolve_to_their_official_md5(real_root):
    ref = resolve_dataset("BreastMNIST", 28, real_root)
    assert (ref.name, ref.size, ref.path) == ("breastmnist", 28, real_root / "breastmnist.npz")
    assert ref.digest == get_dataset("breastmnist").md5(28)
    assert ref.digest == hashlib.md5(ref.path.read_bytes()).hexdigest()


def test_file_digests_are_cached_and_follow_edits(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assert file_digest(path) == hashlib.md5(b"abc").hexdigest()
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open",
                        lambda p, *a, **k: reads.append(p) or real_open(p, *a, **k))
    assert file_digest(path) == hashlib.md5(b"abc").hexdigest() and reads == []  # from the cache
    monkeypatch.undo()
    path.write_bytes(b"abcd")  # new size and mtime: digested afresh
    assert file_digest(path) == hashlib.md5(b"abcd").hexdigest()
    assert file_digest(path, "sha256") == hashlib.sha256(b"abcd").hexdigest()


def test_default_datasets_skip_missing_files_named_ones_do_not(synthetic_root, tmp_path):
    refs, skipped = resolve_datasets(None, [28, 64], synthetic_root)
    found = {(r.name, r.size) for r in refs}
    assert found == {(f, 28) for f in SYNTHETIC_FLAGS} | {("bloodmnist", 64)}
    assert len(skipped) == 12 * 2 - len(found)
    assert "skipped pathmnist@28: pathmnist.npz is not in" in skipped[0]
    with pytest.raises(DataFileMissingError, match="pathmnist.npz"):
        resolve_datasets(["breastmnist", "pathmnist"], [28], synthetic_root)
    with pytest.raises(DataFileMissingError, match="none of the 12 MedMNIST datasets"):
        resolve_datasets(None, [28], tmp_path / "empty")


def test_missing_file_error_names_file_url_and_md5(tmp_path):
    with pytest.raises(DataFileMissingError) as err:
        data_file("dermamnist", 224, tmp_path / "nowhere")
    text = str(err.value)
    assert "dermamnist_224.npz" in text
    assert "zenodo.org" in text
    assert get_dataset("dermamnist").md5(224) in text


def test_data_root_from_environment(synthetic_root, monkeypatch):
    monkeypatch.setenv("MEDFM_DATA_ROOT", str(synthetic_root))
    images, _ = load_split("bloodmnist", 64, "test")
    assert images.shape == (12, 64, 64, 3)


def test_synthetic_layout_matches_official(real_root, tmp_path):
    path = write_synthetic_npz(tmp_path, "breastmnist", 28, n=(5, 3, 2))
    with np.load(path) as syn, np.load(real_root / "breastmnist.npz") as real:
        assert sorted(syn.files) == sorted(real.files)
        for key in real.files:
            assert syn[key].dtype == real[key].dtype
            assert syn[key].shape[1:] == real[key].shape[1:]


def test_sizes_constant():
    assert SIZES == (28, 64, 128, 224)


def test_synthetic_classes_transfer_from_train_to_test(tmp_path):
    from sklearn.linear_model import LogisticRegression

    write_synthetic_npz(tmp_path, "bloodmnist", 28, n=(160, 16, 80))
    x_tr, y_tr = load_split("bloodmnist", 28, "train", tmp_path)
    x_te, y_te = load_split("bloodmnist", 28, "test", tmp_path)
    clf = LogisticRegression(max_iter=1000).fit(x_tr.reshape(160, -1) / 255.0, y_tr.ravel())
    assert clf.score(x_te.reshape(80, -1) / 255.0, y_te.ravel()) > 0.9
