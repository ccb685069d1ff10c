"""Dataset sources as a registry (medfm.datasources): the built-in sources implement the
protocol, medfm.data asks them and never branches on the kind of dataset, and a source defined
in this test (a lab archive serving the real BreastMNIST file under its own name, from a folder
of its own) works through resolve_dataset, load_split and extract after one registration call.
"""

from __future__ import annotations

import ast
import hashlib
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import medfm.data
from medfm.data import get_dataset, load_split, resolve_dataset
from medfm.datasources import SOURCES, DatasetSource, find_dataset, register_source
from medfm.datasources.cards import SOURCE as CARDS
from medfm.datasources.info import DatasetInfo
from medfm.datasources.medmnist import SOURCE as MEDMNIST
from medfm.datasources.npz import NpzSource
from medfm.errors import DataFileMissingError, UnknownDatasetError
from medfm.extract import extract


class LabArchive(NpzSource):
    """Datasets kept in one archive folder, whatever --data-root says; each is a MedMNIST
    dataset's file under a lab's name."""

    name = "lab"
    title = "lab archive"

    def __init__(self, folder: Path, datasets: dict[str, str]):
        self.folder, self.datasets = folder, datasets  # lab name -> MedMNIST flag

    def find(self, key, data_root):
        flag = self.datasets.get(key)
        if flag is None:
            return None
        base = get_dataset(flag)
        return DatasetInfo(flag=key, python_class="", task=base.task,
                           label_names=base.label_names, n_channels=base.n_channels,
                           n_samples=base.n_samples, license=base.license, source=self)

    def known(self):
        return list(self.datasets)

    def listed(self, data_root):
        return list(self.datasets)

    def md5(self, info, size):
        return get_dataset(self.datasets[info.flag]).md5(size)

    def url(self, info, size):
        return ""

    def fetch_hint(self, info, size):
        return f"ask the lab for {info.filename(size)}"

    def refetch_hint(self, info, size):
        return f"delete it and {info.fetch_hint(size)}"

    def file(self, info, size, root):
        path = self.folder / info.filename(size)
        if not path.exists():
            raise DataFileMissingError(f"{path.name} is not in {self.folder}: "
                                       f"{info.fetch_hint(size)}.")
        return path

    def digest_warning(self, info, size, path, digest, rows):
        return None if digest == info.md5(size) else f"{path} is not the lab's file"


@pytest.fixture
def lab(real_root, tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    shutil.copy(real_root / "breastmnist.npz", folder / "breastlab.npz")
    source = register_source(LabArchive(folder, {"breastlab": "breastmnist"}))  # the one call
    yield source
    SOURCES.remove(source)


@pytest.mark.parametrize("source", [MEDMNIST, CARDS], ids=["medmnist", "cards"])
def test_built_in_sources_implement_the_protocol(source):
    assert isinstance(source, DatasetSource) and source in SOURCES


def test_medmnist_flags_come_first_and_describe_themselves(real_root):
    info = get_dataset("BreastMNIST")
    assert info.source is MEDMNIST and find_dataset("breastmnist") is info
    assert info.md5(28) == hashlib.md5((real_root / "breastmnist.npz").read_bytes()).hexdigest()
    assert info.url(28).startswith("https://") and "MD5" in info.fetch_hint(28)


def test_a_registered_source_runs_through_data_and_extract(lab, real_root, tmp_path):
    info = get_dataset("breastlab", tmp_path / "elsewhere")  # the source finds its own files
    assert info.source is lab and info.task == get_dataset("breastmnist").task
    ref = resolve_dataset("breastlab", 28, tmp_path / "elsewhere")
    official = resolve_dataset("breastmnist", 28, real_root)
    assert ref.digest == official.digest  # the MD5 of the file's bytes, whatever the source
    assert ref.path == lab.folder / "breastlab.npz"
    images, labels = load_split("breastlab", 28, "val", tmp_path / "elsewhere")
    expected_images, expected_labels = load_split("breastmnist", 28, "val", real_root)
    assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)
    result = extract(dataset="breastlab", backbone="test_resnet", weights="random", size=28,
                     input_size=32, device="cpu", data_root=tmp_path / "elsewhere",
                     progress=False)
    assert result.path.name.startswith("breastlab_28__")
    with h5py.File(result.path) as fh:
        assert fh["val/labels"][:].tolist() == expected_labels.tolist()
    with pytest.raises(DataFileMissingError, match="ask the lab"):
        resolve_dataset("breastlab", 64)


def test_an_unknown_name_suggests_from_every_source(lab):
    with pytest.raises(UnknownDatasetError, match="breastlab"):
        get_dataset("breastlap")


def test_data_py_asks_the_sources_and_never_the_kind():
    """medfm.data holds no rule of one source: no `info.imported`, `info.card` or source name."""
    tree = ast.parse(Path(medfm.data.__file__).read_text())
    asked = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not asked & {"imported", "card", "python_class"}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert not strings & {MEDMNIST.name, CARDS.name}
