"""Issue 10: a damaged store never feeds a fit, shows as corrupt and names its rebuild command;
non-finite features are refused; one writer per store (real processes, real flock)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
import warnings

import h5py
import numpy as np
import pytest
import torch

from medfm.cli import main
from medfm.errors import StoreError
from medfm.extract import extract
from medfm.data import SPLITS
from medfm.store.features import (FeatureStore, content_fingerprint, is_verified, list_stores,
                                  store_lock, upcast, write_checksums)
from medfm.store.registry import Registry

TINY = dict(backbone="test_resnet", weights="random", input_size=32)
EXTRACT_ARGV = ["extract", "--dataset", "breastmnist", "--size", "28", "--backbone",
                "test_resnet", "--weights", "random", "--input-size", "32", "--quiet"]


@pytest.fixture
def real_store(real_root, tmp_path):
    """A finished store of the real BreastMNIST-28 (tiny random backbone, for speed)."""
    return extract(dataset="breastmnist", size=28, data_root=real_root, workdir=tmp_path,
                   progress=False, **TINY).path


def _probe(workdir, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["probe", "--dataset", "breastmnist", "--fractions", "0.1", "--seeds", "0",
                 "--workdir", str(workdir), "--quiet"])
    return code, capsys.readouterr().err.strip().splitlines()


def _rows(workdir) -> list:
    registry = Registry.in_workdir(workdir)
    try:
        return registry.query()
    finally:
        registry.close()


def test_flipped_label_is_caught_before_any_fit_and_rebuild_fixes_it(real_store, real_root,
                                                                      tmp_path, capsys):
    """The issue's case: one label flipped in train/labels of a finished store; the probe fitted
    on it and recorded the row under the stale fingerprint. Now: exit 2, one line naming the
    store and the command that rebuilds it, no row; `stores` shows it corrupt; the command
    rebuilds it and the probe then runs."""
    with h5py.File(real_store, "r+") as fh:
        fh["train"]["labels"][0, 0] = 1 - fh["train"]["labels"][0, 0]
    code, err = _probe(tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert str(real_store) in err[0] and "damaged" in err[0]
    assert "medfm extract --dataset breastmnist --size 28" in err[0] and "--force" in err[0]
    assert not (tmp_path / "registry.sqlite").exists() or _rows(tmp_path) == []
    assert [r["status"] for r in list_stores(tmp_path)] == ["corrupt"]

    rebuild = err[0].split("`")[1].split()[1:] + ["--data-root", str(real_root), "--quiet"]
    assert main(rebuild) == 0
    assert [r["status"] for r in list_stores(tmp_path)] == ["complete"]
    code, err = _probe(tmp_path, capsys)
    assert code == 0 and len(_rows(tmp_path)) == 1


def test_nan_features_with_a_matching_fingerprint_are_refused(real_store, tmp_path, capsys):
    """NaN written into features and the fingerprint rewritten to match: still one line."""
    with h5py.File(real_store, "r+") as fh:
        fh["val"]["features"][3, :] = np.nan
        fh.attrs["fingerprint"] = content_fingerprint(fh)
        write_checksums(fh, SPLITS)  # every check the store carries agrees with the NaN
    code, err = _probe(tmp_path, capsys)
    assert code == 2 and len(err) == 1
    assert "NaN or infinite" in err[0] and "val/features" in err[0] and str(real_store) in err[0]


def test_verified_once_then_rechecked_after_any_write(real_store, monkeypatch):
    """A finished store is recorded as verified; reads then skip the hash. A write (which moves
    the modification time) makes the next read check the bytes again and catch the change."""
    assert is_verified(real_store, FeatureStore(real_store).fingerprint)
    calls = []
    original = FeatureStore._read_all
    monkeypatch.setattr(FeatureStore, "_read_all", lambda self: calls.append(1) or original(self))
    FeatureStore(real_store).features("train")
    assert calls == []  # verified when it was finalized: no second full read

    with h5py.File(real_store, "r+") as fh:
        fh["test"]["features"][5, 7] += 0.5
    store = FeatureStore(real_store)
    assert not is_verified(real_store, store.fingerprint)
    with pytest.raises(StoreError, match="test/features rows 0-.* fail their checksum"):
        store.features("train")
    assert calls == [1]


def test_stores_verb_rechecks_a_changed_store(real_store, tmp_path, capsys):
    with h5py.File(real_store, "r+") as fh:
        fh["test"]["index"][0] = 99
    assert main(["stores", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "corrupt" in out and "complete" not in out


def test_nan_from_the_backbone_stops_extraction_with_one_line(synthetic_root, tmp_path, capsys):
    """Weights with a NaN make every feature NaN: one line, nothing at the final path."""
    from medfm.backbones import create_backbone

    state = create_backbone("test_resnet", weights="random").model.state_dict()
    name = next(k for k, v in state.items() if k.endswith("weight") and v.dim() == 4)
    state[name] = torch.full_like(state[name], float("nan"))
    weights = tmp_path / "nan.pth"
    torch.save(state, weights)
    argv = ["extract", "--dataset", "breastmnist", "--size", "28", "--backbone", "test_resnet",
            "--weights", str(weights), "--input-size", "32", "--data-root", str(synthetic_root),
            "--workdir", str(tmp_path / "w"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN or infinite features" in err[0] and "train" in err[0]
    assert list((tmp_path / "w" / "stores").glob("*.h5")) == []


def _extract_cmd(root, workdir) -> list[str]:
    return [sys.executable, "-m", "medfm", *EXTRACT_ARGV, "--data-root", str(root),
            "--workdir", str(workdir)]


def test_a_second_extract_waits_for_the_lock_holder(synthetic_root, tmp_path):
    """A real process finds the store's lock held: it says for whom it waits, writes nothing
    while it waits, then builds once the holder lets go."""
    from medfm.resolve.store import resolve_store_request
    from medfm.preprocess import PreprocessRequest
    from medfm.store.features import stores_dir

    request = resolve_store_request(dataset="breastmnist", size=28, backbone="test_resnet",
                                    weights="random", data_root=synthetic_root,
                                    preprocess=PreprocessRequest(input_size=32))
    path = stores_dir(tmp_path) / request.filename()
    with store_lock(path):
        proc = subprocess.Popen(_extract_cmd(synthetic_root, tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        first = ""
        while time.time() < deadline and not first:
            first = proc.stderr.readline()
        assert f"waiting for pid {os.getpid()}" in first
        time.sleep(1.0)
        assert proc.poll() is None
        assert not list(path.parent.glob("*.h5*"))  # nothing written while waiting
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "built" in out and path.exists()
    FeatureStore(path).verify(force=True)


def test_two_concurrent_extracts_build_one_complete_store(synthetic_root, tmp_path):
    """Two real processes asked for the same store at once: one builds, the other waits and
    reuses it; the final .h5 is complete and no partial file is left."""
    procs = [subprocess.Popen(_extract_cmd(synthetic_root, tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert sorted(": built ->" in out for out, _ in outs) == [False, True]
    assert any("already extracted" in out for out, _ in outs)
    stores = tmp_path / "stores"
    assert len(list(stores.glob("*.h5"))) == 1 and not list(stores.glob("*.partial"))
    FeatureStore(next(stores.glob("*.h5"))).verify(force=True)


def test_a_killed_lock_holder_never_blocks_a_rerun(synthetic_root, tmp_path):
    """flock is released by the OS when its holder is SIGKILLed."""
    lock_dir = tmp_path / "stores" / ".locks"
    lock_dir.mkdir(parents=True)
    lock = lock_dir / "x.h5.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; fh = open(sys.argv[1], 'a+'); "
        "fcntl.flock(fh, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"),
        str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with open(lock, "a+") as fh:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now


def test_no_wait_lock_is_one_line(tmp_path):
    path = tmp_path / "stores" / "a.h5"
    path.parent.mkdir(parents=True)
    with store_lock(path):
        child = subprocess.run([sys.executable, "-c", (
            "import sys; from pathlib import Path; from medfm.store.features import store_lock\n"
            "try:\n    with store_lock(Path(sys.argv[1]), wait=False): pass\n"
            "except Exception as e: print(type(e).__name__, e)"), str(path)],
            capture_output=True, text=True, timeout=60)
    assert child.stdout.startswith("StoreError another process (pid ")
    assert str(os.getpid()) in child.stdout


LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from medfm.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_disk_full_during_extraction_is_one_line_and_the_rerun_completes(real_root, tmp_path):
    """A store that cannot fit (a real file-size limit, checked like the free space of a full
    disk) stops before any image is embedded: exit 2, one line, nothing half-written; the rerun
    with room builds the same store."""
    argv = [*EXTRACT_ARGV, "--data-root", str(real_root), "--batch-size", "64"]
    reference = extract(dataset="breastmnist", size=28, data_root=real_root,
                        workdir=tmp_path / "ref", progress=False, batch_size=64, **TINY).path
    limit = reference.stat().st_size // 2
    failed = subprocess.run([sys.executable, "-c", LIMITED, str(limit), *argv, "--workdir",
                             str(tmp_path / "w")], capture_output=True, text=True, timeout=300)
    err = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(err) == 1, failed.stderr
    assert "file-size limit" in err[0] and "rerun" in err[0]
    stores = tmp_path / "w" / "stores"
    assert list(stores.glob("*.h5*")) == []
    assert main([*argv, "--workdir", str(tmp_path / "w")]) == 0
    built = next(stores.glob("*.h5"))
    assert FeatureStore(built).fingerprint == FeatureStore(reference).fingerprint
    assert not list(stores.glob("*.partial"))


def test_a_stores_path_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "stores").write_text("not a folder")
    assert main(["stores", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0]


@pytest.mark.parametrize("torch_loaded", [True, False])
def test_upcast_is_numpy_astype_bit_for_bit(torch_loaded, monkeypatch):
    """Every float16 bit pattern (subnormals, -0, infinities, NaN), contiguous and strided,
    upcasts to the float32 numpy's astype gives: through torch when it is loaded, else through
    the table (which must not import torch)."""
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    read_only = every.copy()
    read_only.flags.writeable = False
    if not torch_loaded:
        monkeypatch.delitem(sys.modules, "torch")
    for values in (every, every[:, ::3], read_only):
        expected = values.astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns on sharing a read-only array
            got = upcast(values)
        assert got.dtype == np.float32 and got.shape == values.shape
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    assert ("torch" in sys.modules) == torch_loaded
    assert upcast(every, np.float64).dtype == np.float64  # other casts are numpy's


def test_store_features_are_the_stored_float16_upcast(real_store):
    """What a store returns is its float16 dataset, upcast exactly."""
    with h5py.File(real_store, "r") as fh:
        stored = fh["train"]["features"][()]
    assert stored.dtype == np.float16
    got = FeatureStore(real_store).features("train")
    assert got.dtype == np.float32
    assert np.array_equal(got, stored.astype(np.float32))
