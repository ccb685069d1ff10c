"""Shared fixtures: isolated work folders, synthetic MedMNIST files, the real data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medfm.synthetic import write_synthetic_npz

REPO = Path(__file__).resolve().parents[1]
REAL_FILES = ("breastmnist.npz", "breastmnist_64.npz", "pneumoniamnist.npz")  # the tests read


def _real_data() -> Path:
    """$MEDFM_DATA_ROOT, unless it lacks files the tests read that ../shared has (`make test`
    exports the repository's own data/medmnist, which holds BreastMNIST-28 only)."""
    shared = REPO.parent / "shared/data/medmnist"
    asked = Path(os.environ["MEDFM_DATA_ROOT"]) if os.environ.get("MEDFM_DATA_ROOT") else shared
    complete = lambda root: all((root / name).exists() for name in REAL_FILES)  # noqa: E731
    return shared if not complete(asked) and complete(shared) else asked


REAL_DATA = _real_data()

# one dataset per task type and channel count
SYNTHETIC_FLAGS = {
    "breastmnist": "binary, grayscale",
    "bloodmnist": "multi-class, RGB",
    "chestmnist": "multi-label, grayscale",
    "retinamnist": "ordinal, RGB",
    "organamnist": "multi-class, grayscale",
}


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory) -> Path:
    """medfm's machine-wide cache (file digests, timm registry snapshot), shared by the session."""
    return tmp_path_factory.mktemp("medfm-cache")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch, _session_cache):
    """Every test gets its own workdir and npy cache, never downloads, and reads none of the
    user's environment."""
    monkeypatch.setenv("MEDFM_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("MEDFM_NPY_CACHE", str(tmp_path / "npy-cache"))
    monkeypatch.setenv("MEDFM_CACHE", str(_session_cache))
    monkeypatch.setenv("MEDFM_OFFLINE", "1")
    monkeypatch.delenv("MEDFM_DATA_ROOT", raising=False)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A data root with small synthetic npz files for every task type, at 28 and 64 px."""
    root = tmp_path_factory.mktemp("medmnist-synthetic")
    for flag in SYNTHETIC_FLAGS:
        write_synthetic_npz(root, flag, size=28, n=(48, 16, 24))
    write_synthetic_npz(root, "bloodmnist", size=64, n=(24, 8, 12))
    write_synthetic_npz(root, "breastmnist", size=128, n=(12, 4, 6))
    return root


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The official MedMNIST files shipped in ../shared (BreastMNIST 28/64, PneumoniaMNIST 28)."""
    if not (REAL_DATA / "breastmnist.npz").exists():
        pytest.skip(f"real MedMNIST files not found in {REAL_DATA} (set MEDFM_DATA_ROOT)")
    return REAL_DATA


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA sees a GPU; elsewhere they skip, saying why."""
    from medfm.runtime import cuda_available

    if any("gpu" in item.keywords for item in items) and not cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)



@pytest.fixture(scope="session")
def ranked_workdir(tmp_path_factory, _session_cache, real_root, synthetic_root) -> Path:
    """A work directory of real probe rows: 4 backbones x 4 datasets (2 real, 2 synthetic), one
    backbone missing a dataset (tests/ranked_workdir.py). Shared: copy it before changing it."""
    from tests.ranked_workdir import build

    with pytest.MonkeyPatch.context() as mp:  # session fixtures run before _isolated_env
        mp.setenv("MEDFM_CACHE", str(_session_cache))
        mp.setenv("MEDFM_OFFLINE", "1")
        mp.setenv("MEDFM_NPY_CACHE", str(tmp_path_factory.mktemp("ranked-npy")))
        return build(tmp_path_factory.mktemp("ranked") / "work", real_root, synthetic_root)
