"""Every user error is one line and exit 2, and leaves finished work as it was.

A table of bad inputs, one per row, each run through the CLI (in process; a few rows through a
real `python -m medfm` subprocess) against a work directory holding one finished store and
registry row. Each row asserts exit code 2, exactly one non-empty line on stderr naming the
problem, no traceback, no *.partial / *.tmp file left behind, and the finished store, data files
and registry rows unchanged (bytes, modification times, rows). Inputs are real files: npz files
written with numpy, YAML files, a file where a folder should be; the read-only and disk-full
rows run in a private mount namespace (a read-only bind mount, a 64 KiB tmpfs).

Issue 26 added: runaway inputs (refused before they allocate, also under a 6 GiB address-space
limit in a real process), files whose names claim another identity, bit rot that keeps size and
mtime, a registry with damaged pages, a fuzz of the npz reader (500 flipped bytes of the real
BreastMNIST-28 file), decompression bombs and other import cases on real BreastMNIST PNGs and
pydicom's own DICOM files, concurrent imports of one name, and commands that must create
nothing. Each was checked to fail on the code before its fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medfm.cli import main
from medfm.data import SPLITS
from medfm.synthetic import synthetic_arrays, write_synthetic_npz

TINY = ["--backbone", "test_efficientnet", "--weights", "random", "--input-size", "32",
        "--quiet"]
N_ROWS = (48, 16, 24)  # train, val, test rows of the synthetic BreastMNIST


@pytest.fixture(scope="module")
def finished(tmp_path_factory, _session_cache, real_root) -> dict:
    """A data root with a good BreastMNIST-28 and a work directory holding its finished store
    and one registry row (built before any bad input is tried)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data, work = root / "data", root / "work"
    write_synthetic_npz(data, "breastmnist", 28, n=N_ROWS)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MEDFM_CACHE", str(_session_cache))
        env.setenv("MEDFM_NPY_CACHE", str(root / "npy"))
        env.setenv("MEDFM_OFFLINE", "1")
        assert main(["extract", "--dataset", "breastmnist", "--size", "28", "--data-root",
                     str(data), "--workdir", str(work), *TINY]) == 0
        assert main(["probe", "--workdir", str(work), "--fractions", "1.0", "--seeds", "0",
                     "--quiet"]) == 0
    return {"root": root, "data": data, "work": work, "real": real_root}


def _arrays() -> dict:
    """The arrays of a good synthetic breastmnist.npz, to spoil one at a time."""
    arrays = {}
    for i, (split, n) in enumerate(zip(SPLITS, N_ROWS, strict=True)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = synthetic_arrays(
            "breastmnist", 28, n, seed=i)
    return arrays


def _bad_npz(folder: Path, spoil) -> Path:
    """`folder` holding a breastmnist.npz whose arrays `spoil(arrays)` changed; returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = _arrays()
    spoil(arrays)
    np.savez(folder / "breastmnist.npz", **arrays)
    return folder


def _yaml(path: Path, body: str | bytes, data: Path, weights: str | Path = "random") -> Path:
    head = (f"datasets: [breastmnist]\nbackbones: [test_efficientnet]\nweights: {weights}\n"
            f"input_size: 32\nmethods: [logreg]\ndata_root: {data}\n")
    path.write_bytes(head.encode() + (body if isinstance(body, bytes) else body.encode()))
    return path


def _extract_from(data: Path, work: Path) -> list[str]:
    return ["extract", "--dataset", "breastmnist", "--size", "28", "--data-root", str(data),
            "--workdir", str(work), *TINY]


def _set(arrays, key, value):
    arrays[key] = value


def _finetune(f: dict, *extra: str, work: Path | None = None) -> list[str]:
    return ["finetune", "--dataset", "breastmnist", "--size", "28", "--data-root", str(f["data"]),
            "--workdir", str(work or f["work"]), "--backbone", "test_efficientnet",
            "--weights", "random", "--quiet", *extra]


def _png_folder(real: Path, folder: Path) -> Path:
    """Two class folders of real BreastMNIST images (4 PNGs each)."""
    from PIL import Image

    with np.load(real / "breastmnist.npz") as npz:
        images, labels = npz["train_images"], npz["train_labels"][:, 0]
    for label in (0, 1):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == label)[:4]:
            Image.fromarray(images[i]).save(folder / f"class{label}" / f"{i}.png")
    return folder


def _labels_csv(real: Path, folder: Path, label_of_last: str) -> Path:
    """A CSV over `_png_folder`'s images whose last row's label is `label_of_last`."""
    src = _png_folder(real, folder / "src")
    rows = [f"{p.relative_to(src)},{p.parent.name}" for p in sorted(src.rglob("*.png"))]
    rows[-1] = rows[-1].rsplit(",", 1)[0] + "," + label_of_last
    (folder / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return folder / "labels.csv"


def _work_copy(f: dict, t: Path) -> Path:
    """A copy of the finished work directory, to plant files in."""
    return Path(shutil.copytree(f["work"], t / "work"))


def _only_store(work: Path) -> Path:
    (store,) = (work / "stores").glob("*.h5")
    return store


def _store_on_another_name(f: dict, t: Path) -> Path:
    """The finished store copied onto the file name of another request (input size 48): what a
    store found by that name must not be trusted for."""
    from medfm.preprocess import PreprocessRequest
    from medfm.resolve.store import resolve_store_request

    work = _work_copy(f, t)
    other = resolve_store_request(dataset="breastmnist", size=28, data_root=f["data"],
                                  backbone="test_efficientnet", weights="random",
                                  preprocess=PreprocessRequest(input_size=48), device="cpu")
    planted = work / "stores" / other.filename()
    shutil.copy2(_only_store(work), planted)
    _only_store(f["work"])  # the fixture's own work directory still holds its one store
    return planted


def _rotted_store(f: dict, t: Path) -> Path:
    """A work copy whose store was verified, then had one train label flipped in place with
    its size and modification time kept (bit rot the verified cache cannot see); returns the
    work directory."""
    import h5py

    from medfm.store.features import FeatureStore

    work = _work_copy(f, t)
    store = _only_store(work)
    FeatureStore(store).verify()  # recorded as verified, as any store that was read once
    stat = store.stat()
    with h5py.File(store, "r+") as fh:
        fh["train"]["labels"][0, 0] = 1 - fh["train"]["labels"][0, 0]
    os.utime(store, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.stat().st_size == stat.st_size
    return work


def _png(path: Path, width: int, height: int, *, rows: int | None = None) -> Path:
    """A grayscale PNG of width x height whose first `rows` rows (all, if None) are written:
    a real PNG stream (IHDR, IDAT, IEND) for any size, without the pixels in memory."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    packer = zlib.compressobj()
    line = bytes(width + 1)  # filter byte 0, then black pixels
    idat = b"".join(packer.compress(line) for _ in range(height if rows is None else rows))
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat + packer.flush()) + chunk(b"IEND", b""))
    return path


class _Shell:
    """Pickles as a call of os.system: what a crafted weights file would make torch.load run."""

    def __reduce__(self):
        return os.system, ("true",)


def _pickled_weights(t: Path) -> Path:
    import torch

    torch.save({"model": _Shell()}, t / "evil.pth")
    return t / "evil.pth"


def _store_copy(f: dict, t: Path, name_suffix: str = "", keep_bytes: int | None = None) -> Path:
    """The finished store copied into a work copy under its name + `name_suffix`, its first
    `keep_bytes` bytes only if given (a truncated file)."""
    work = _work_copy(f, t)
    store = _only_store(work)
    copy = store.with_name(store.name + name_suffix)
    data = store.read_bytes()
    store.unlink()
    copy.write_bytes(data if keep_bytes is None else data[:keep_bytes])
    return copy


def _import(f: dict, t: Path, *extra: str) -> list[str]:
    return ["import", "mybreast", str(_png_folder(f["real"], t / "src")), "--sizes", "28",
            "--data-root", str(t / "imported"), "--quiet", *extra]


# --- the table ----------------------------------------------------------------------------------
# id -> (make argv from (finished, tmp_path), words the one stderr line must contain)
NPZ_ROWS = {  # extract with a broken data file: refused before any model loads
    "npz-too-few-labels": (lambda a: _set(a, "train_labels", a["train_labels"][:-3]),
                           "train_labels is shaped (45, 1), not (48, 1)"),
    "npz-too-many-labels": (lambda a: _set(a, "train_labels",
                                           np.concatenate([a["train_labels"]] * 2)),
                            "train_labels is shaped (96, 1), not (48, 1)"),
    "npz-2d-images": (lambda a: _set(a, "train_images", a["train_images"].reshape(48, -1)),
                      "train_images is uint8 (48, 784)"),
    "npz-float-images": (lambda a: _set(a, "train_images", a["train_images"] / 255.0),
                         "train_images is float64"),
    "npz-rgb-for-grayscale": (lambda a: _set(a, "val_images",
                                             np.stack([a["val_images"]] * 3, axis=-1)),
                              "(16, 28, 28, 3), not uint8 (N, 28, 28)"),
    "npz-wrong-side": (lambda a: _set(a, "test_images", a["test_images"][:, :20, :20]),
                       "test_images is uint8 (24, 20, 20)"),
    "npz-1d-labels": (lambda a: _set(a, "train_labels", a["train_labels"][:, 0]),
                      "train_labels is shaped (48,)"),
    "npz-label-out-of-range": (lambda a: a["test_labels"].__setitem__(0, 7),
                               "test_labels range over 0..7, not class ids 0..1"),
    "npz-float-labels": (lambda a: _set(a, "val_labels", a["val_labels"].astype(np.float32)),
                         "val_labels are float32, not integers"),
    "npz-missing-array": (lambda a: a.pop("val_images"), "lacks val_images"),
}

GRID_YAML = {  # grid --dry-run with a spec field of the wrong type
    "yaml-sizes-text": ('sizes: "twenty"\n', "'sizes' holds 'twenty'"),
    "yaml-seeds-text": ('sizes: [28]\nseeds: ["a"]\n', "'seeds' holds 'a'"),
    "yaml-fractions-text": ('sizes: [28]\nfractions: ["abc"]\n', "'fractions' holds 'abc'"),
    "yaml-fraction-bool": ("sizes: [28]\nfractions: [true]\n", "'fractions' holds True"),
    "yaml-seed-float": ("sizes: [28]\nseeds: [1.5]\n", "'seeds' holds 1.5"),
    "yaml-sizes-nested": ("sizes: [[28]]\n", "'sizes' holds [28]"),
    "yaml-not-utf8": (b"sizes: [28]\nseeds: [0] # \xff\xfe\n", "is not UTF-8"),
    "yaml-nested-5000-deep": ("sizes: " + "[" * 5000 + "28" + "]" * 5000 + "\n",
                              "more than 16 deep"),
    "yaml-list-too-long": ("sizes: [28]\nseeds: [" + ",".join(map(str, range(1001))) + "]\n",
                           "1,001 values, above medfm's limit of 1,000"),
    "yaml-expands-too-far": ("sizes: [28]\nmethods: [logreg, knn]\nfractions: []\nshots: ["
                             + ",".join(map(str, range(1, 601))) + "]\nseeds: ["
                             + ",".join(map(str, range(1000))) + "]\n",
                             "expands to up to 1,200,000 jobs"),
}


def _rows() -> dict:
    rows = {}
    for name, (spoil, needle) in NPZ_ROWS.items():
        rows[name] = (lambda f, t, spoil=spoil: _extract_from(_bad_npz(t / "data", spoil),
                                                              f["work"]), needle)
    rows["npz-empty-file"] = (
        lambda f, t: _extract_from(_empty_npz(t / "data"), f["work"]),
        "is not a readable MedMNIST npz")
    for name, (body, needle) in GRID_YAML.items():
        rows[name] = (lambda f, t, body=body: ["grid", str(_yaml(t / "g.yaml", body, f["data"])),
                                               "--dry-run", "--workdir", str(f["work"])], needle)
    rows.update({
        "grid-unknown-backbone": (
            lambda f, t: ["grid", str(_yaml(t / "g.yaml", "sizes: [28]\n", f["data"])),
                          "--backbone", "no_such_net", "--dry-run", "--workdir", str(f["work"])],
            "unknown backbone 'no_such_net'"),
        "grid-executor-nan": (
            lambda f, t: ["grid", str(_yaml(t / "g.yaml", "sizes: [28]\n", f["data"])),
                          "--executor", "slurm", "--poll-s", "nan", "--dry-run",
                          "--workdir", str(f["work"])], "--poll-s"),
        "report-out-is-a-file": (
            lambda f, t: ["report", "--workdir", str(f["work"]), "--out", str(_file(t / "x"))],
            "is a file"),
        "report-out-under-a-file": (
            lambda f, t: ["report", "--workdir", str(f["work"]), "--out",
                          str(_file(t / "x") / "rep")], "is a file"),
        "workdir-is-a-file": (
            lambda f, t: ["probe", "--workdir", str(_file(t / "w"))], "is a file"),
        "extract-empty-dataset": (
            lambda f, t: ["extract", "--dataset", "", "--size", "28", "--data-root",
                          str(f["data"]), "--workdir", str(f["work"]), *TINY], "--dataset ''"),
        "extract-empty-size": (
            lambda f, t: ["extract", "--dataset", "breastmnist", "--size", "", "--data-root",
                          str(f["data"]), "--workdir", str(f["work"]), *TINY], "--size ''"),
        "extract-empty-size-item": (
            lambda f, t: ["extract", "--dataset", "breastmnist", "--size", "28,", "--data-root",
                          str(f["data"]), "--workdir", str(f["work"]), *TINY], "empty item"),
        "probe-empty-dataset": (
            lambda f, t: ["probe", "--dataset", "", "--workdir", str(f["work"]), "--quiet"],
            "--dataset ''"),
        "probe-empty-workdir": (lambda f, t: ["probe", "--workdir", ""], "--workdir ''"),
        "results-unpublished-size": (
            lambda f, t: ["results", "--size", "29", "--workdir", str(f["work"])],
            "not published"),
        "results-unknown-dataset": (
            lambda f, t: ["results", "--dataset", "nosuchmnist", "--workdir", str(f["work"])],
            "unknown dataset"),
        "results-unknown-method": (
            lambda f, t: ["results", "--method", "svm", "--workdir", str(f["work"])],
            "--method 'svm'"),
        "argparse-unknown-option": (
            lambda f, t: ["probe", "--no-such-option", "--workdir", str(f["work"])],
            "unrecognized arguments"),
        # bounded before they allocate (medfm.limits; also run under a memory limit below)
        "probe-seeds-runaway-range": (
            lambda f, t: ["probe", "--workdir", str(f["work"]), "--seeds", "0-100000000"],
            "100,000,001 values, above medfm's limit of 1,000"),
        "probe-seed-above-2pow32": (
            lambda f, t: ["probe", "--workdir", str(f["work"]), "--seeds", "4294967296"],
            "0..4294967295"),
        "finetune-seed-above-2pow32": (lambda f, t: _finetune(f, "--seeds", "4294967296"),
                                     "0..4294967295"),
        "finetune-seed-overflow": (
            lambda f, t: _finetune(f, "--seeds", "99999999999999999999999"), "0..4294967295"),
        "finetune-lora-rank-runaway": (lambda f, t: _finetune(f, "--lora-rank", "1000000"),
                                       "lora_rank 1000000 is above medfm's limit of 1,024"),
        "finetune-input-size-runaway": (lambda f, t: _finetune(f, "--input-size", "100000"),
                                        "input size 100000 is above medfm's limit of 1,024"),
        "finetune-epochs-runaway": (lambda f, t: _finetune(f, "--epochs", "100000000"),
                                    "epochs 100000000 is above medfm's limit of 10,000"),
        "finetune-batch-runaway": (lambda f, t: _finetune(f, "--batch-size", "1000000"),
                                   "batch_size 1000000 is above medfm's limit of 4,096"),
        "extract-input-size-runaway": (
            lambda f, t: [*_extract_from(f["data"], f["work"]), "--input-size", "100000"],
            "input size 100000 is above medfm's limit of 1,024"),
        "extract-batch-runaway": (
            lambda f, t: [*_extract_from(f["data"], f["work"]), "--batch-size", "100000"],
            "batch size 100000 is above medfm's limit of 4,096"),
        "extract-batch-pixels-runaway": (
            lambda f, t: [*_extract_from(f["data"], f["work"]), "--input-size", "1024",
                          "--batch-size", "4096"], "pixels per batch"),
        "probe-episodes-runaway": (
            lambda f, t: ["probe", "--workdir", str(f["work"]), "--method", "simpleshot",
                          "--shots", "1,2,3", "--episodes", "100000000"],
            "above medfm's limit of 10,000"),
        "probe-episodes-times-seeds-runaway": (
            lambda f, t: ["probe", "--workdir", str(f["work"]), "--method", "simpleshot",
                          "--shots", "1", "--seeds", "0-999", "--episodes", "9999"],
            "shots x seeds x episodes"),
        "probe-episodes-zero": (
            lambda f, t: ["probe", "--workdir", str(f["work"]), "--shots", "1", "--episodes",
                          "0"], "--episodes '0' is not a positive integer"),
        "probe-episode-file-not-json": (
            lambda f, t: ["probe", "--workdir", str(f["work"]), "--episode-file",
                          str(_file(t / "e.json"))], "is not JSON"),
        "probe-zero-shot-without-clip": (
            lambda f, t: ["probe", "--workdir", str(f["work"]), "--method", "zero-shot"],
            "CLIP-family"),
        "probe-zero-shot-templates-without-braces": (
            lambda f, t: ["probe", "--workdir", str(f["work"]), "--method", "zero-shot",
                          "--zs-templates", str(_text(t / "t.txt", "a scan\n"))],
            "needs exactly one {}"),
        "extract-severities-runaway": (
            lambda f, t: [*_extract_from(f["data"], f["work"]), "--corruptions", "medmnist-c",
                          "--severities", "1..100000000"], "above medfm's limit of 1,000"),
        "extract-corruption-seed-negative": (
            lambda f, t: [*_extract_from(f["data"], f["work"]), "--corruptions", "medmnist-c",
                          "--corruption-seed", "-1"], "--corruption-seed must be"),
        "import-png-decompression-bomb": (  # Pillow's DecompressionBombError, traceback
            lambda f, t: [*_import(f, t), *()] if _png(
                _png_folder(f["real"], t / "src") / "class0" / "bomb.png", 20000, 20000,
                rows=1) else [], "bomb.png: more than 178,956,970 pixels, above medfm's limit"),
        "import-png-above-the-pixel-limit": (  # 1-2x Pillow's bound: decoded whole, 100 MB
            lambda f, t: [*_import(f, t), *()] if _png(
                _png_folder(f["real"], t / "src") / "class1" / "big.png", 10000, 10000) else [],
            "big.png: 10000 x 10000 = 100,000,000 pixels, above medfm's limit of 89,478,485"),
        # the smaller list
        "probe-a-partial-store": (
            lambda f, t: ["probe", "--store", str(_store_copy(f, t, ".partial")), "--workdir",
                          str(t / "work"), "--quiet"],
            "resumes from its last complete chunk when you rerun `medfm extract --dataset "
            "breastmnist --size 28"),
        "probe-a-truncated-store": (
            lambda f, t: ["probe", "--store", str(_store_copy(f, t, keep_bytes=4096)),
                          "--workdir", str(t / "work"), "--quiet"],
            "rebuild it with `medfm extract --dataset breastmnist --size 28 --backbone "
            "test_efficientnet.r160_in1k --resize-policy bilinear --input-size 32 --dtype "
            "float16 --workdir"),
        "finetune-set-nan": (lambda f, t: _finetune(f, "--set", "lr_head=nan"),
                             "recipe field lr_head must be a finite number; got nan."),
        "extract-pickled-weights": (
            lambda f, t: [*_extract_from(f["data"], f["work"]), "--input-size", "48",
                          "--weights", str(_pickled_weights(t))],
            "holds pickled Python objects beyond tensors (posix.system)"),
        "import-workers-runaway": (lambda f, t: _import(f, t, "--workers", "100000"),
                                   "--workers 100000 is above medfm's limit of 256"),
        "import-workers-zero": (lambda f, t: _import(f, t, "--workers", "0"),
                                "--workers must be at least 1"),
        "grid-max-workers-runaway": (
            lambda f, t: ["grid", str(_yaml(t / "g.yaml", "sizes: [28]\n", f["data"])),
                          "--max-workers", "100000", "--dry-run", "--workdir", str(f["work"])],
            "--max-workers 100000 is above medfm's limit of 256"),
        "import-seed-negative": (lambda f, t: _import(f, t, "--seed", "-1"),
                                 "--seed must be a whole number in 0..4294967295"),
        "import-split-nan": (lambda f, t: _import(f, t, "--split", "nan,0.5,0.5"),
                             "--split nan,0.5,0.5 must be three positive fractions"),
        "import-label-nan": (
            lambda f, t: ["import", "mybreast", str(t / "src"), "--labels",
                          str(_labels_csv(f["real"], t, "nan")), "--sizes", "28",
                          "--data-root", str(t / "imported"), "--quiet"],
            "has label 'nan', a missing-value marker"),
        "grid-too-many-jobs-without-yes": (
            lambda f, t: ["grid", str(_yaml(t / "g.yaml", "sizes: [28]\nfractions: []\nshots: ["
                                       + ",".join(map(str, range(1, 12))) + "]\nseeds: ["
                                       + ",".join(map(str, range(1000))) + "]\n", f["data"])),
                          "--workdir", str(f["work"]), "--quiet"],
            "11,000 jobs to run, above the 10,000 that run without confirmation"),
        # identity checked on read: a file's name is a claim its contents must back
        "store-copied-onto-another-requests-name-extract": (
            lambda f, t: [*_extract_from(f["data"], Path(_store_on_another_name(f, t)).parents[1]),
                          "--input-size", "48", "--device", "cpu"],
            "is named for request"),
        "store-copied-onto-another-requests-name-probe": (
            lambda f, t: ["probe", "--store", str(_store_on_another_name(f, t)),
                          "--workdir", str(t / "work"), "--quiet"],
            "it was copied or renamed onto this name"),
        # bit rot caught at read cost: block checksums, whatever the mtime says
        "store-bit-rot-same-size-and-mtime": (
            lambda f, t: ["probe", "--workdir", str(_rotted_store(f, t)), "--fractions", "0.5",
                          "--quiet"], "train/labels rows 0-47 fail their checksum"),
        "argparse-bad-choice": (
            lambda f, t: ["probe", "--method", "svm", "--workdir", str(f["work"])],
            "invalid choice"),
    })
    return rows


def _empty_npz(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "breastmnist.npz").write_bytes(b"")
    return folder


def _file(path: Path) -> Path:
    path.write_text("not a folder\n")
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


ROWS = _rows()


# --- what "nothing changed" means -----------------------------------------------------------------

def _registry_rows(work: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{work / 'registry.sqlite'}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT * FROM results ORDER BY digest").fetchall()


def _finished_files(finished: dict) -> dict[str, tuple]:
    """Bytes digest and mtime of every finished file (stores, data), registry rows aside."""
    files = {}
    for folder in (finished["work"] / "stores", finished["data"]):
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.endswith(".lock"):
                stat = path.stat()
                files[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                    stat.st_mtime_ns)
    return files


def _half_written(*folders: Path) -> set[str]:
    return {str(p) for folder in folders for pattern in ("*.partial", "*.tmp*")
            for p in folder.rglob(pattern)}


def _state(finished: dict, tmp_path: Path) -> tuple:
    cache = Path(os.environ["MEDFM_CACHE"])
    return (_finished_files(finished), _registry_rows(finished["work"]),
            _half_written(finished["root"], tmp_path, cache))


def _assert_one_line(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0], err


# --- the tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("row", sorted(ROWS))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(row, finished, tmp_path, capsys):
    make_argv, needle = ROWS[row]
    argv = make_argv(finished, tmp_path)
    before = _state(finished, tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = exc.code
    _assert_one_line(code, capsys.readouterr().err, needle)
    assert _state(finished, tmp_path) == before


def _medfm(*argv: str, prefix: tuple[str, ...] = (),
           memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """`python -m medfm ARGV` in a real process (after `prefix`, e.g. a mount namespace), its
    address space capped at `memory_limit` bytes if given."""
    command = [*prefix, sys.executable, "-m", "medfm", *argv]
    cap = None if memory_limit is None else (
        lambda: resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit)))
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ,
                          preexec_fn=cap)


# enough address space for a real extract or fine-tune of BreastMNIST-28 with one OpenMP
# thread (checked by hand: `medfm finetune ... --epochs 1` runs to its row under it), far less
# than any of these inputs would take unbounded (17 GB to 560 GB)
MEMORY_LIMIT = 6 << 30
RUNAWAY_ROWS = ["probe-seeds-runaway-range", "probe-episodes-runaway", "finetune-lora-rank-runaway",
                "finetune-input-size-runaway", "extract-input-size-runaway",
                "extract-batch-pixels-runaway", "extract-severities-runaway",
                "yaml-expands-too-far"]


@pytest.mark.parametrize("row", RUNAWAY_ROWS)
def test_runaway_inputs_are_refused_before_they_allocate(row, finished, tmp_path, monkeypatch):
    """Under a 6 GiB address-space limit, each runaway input is the one-line refusal (not a
    MemoryError, an allocator abort or the kernel's OOM killer)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each OpenMP thread reserves address space
    make_argv, needle = ROWS[row]
    argv = make_argv(finished, tmp_path)
    before = _state(finished, tmp_path)
    done = _medfm(*argv, memory_limit=MEMORY_LIMIT)
    _assert_one_line(done.returncode, done.stderr, needle)
    assert _state(finished, tmp_path) == before


@pytest.mark.parametrize("row", ["npz-empty-file", "yaml-sizes-text", "argparse-unknown-option"])
def test_a_real_process_exits_2_with_one_line(row, finished, tmp_path):
    make_argv, needle = ROWS[row]
    argv = make_argv(finished, tmp_path)
    before = _state(finished, tmp_path)
    done = _medfm(*argv)
    _assert_one_line(done.returncode, done.stderr, needle)
    assert _state(finished, tmp_path) == before


def _namespace_or_skip() -> tuple[str, ...]:
    """`unshare -m`: a private mount namespace, so mounts made in it vanish with the process."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs none "$(mktemp -d)"'],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a private namespace here: {probe.stderr.decode().strip()}")
    return ("unshare", "-m", "sh", "-c", 'eval "$MOUNT" && exec "$@"', "sh")


@pytest.mark.parametrize("verb", ["extract", "report"])
def test_read_only_workdir_is_one_line(verb, finished, tmp_path, monkeypatch):
    """A read-only bind mount of the work directory (real EROFS, as root too)."""
    prefix = _namespace_or_skip()
    work = finished["work"]
    monkeypatch.setenv("MOUNT", f"mount --bind {work} {work} && "
                                f"mount -o remount,bind,ro {work}")
    argv = {"extract": [*_extract_from(finished["data"], work), "--input-size", "48"],  # new
            "report": ["report", "--workdir", str(work), "--out", str(work / "report-ro")]}[verb]
    before = _state(finished, tmp_path)
    done = _medfm(*argv, prefix=prefix)
    _assert_one_line(done.returncode, done.stderr, "read-only")
    assert _state(finished, tmp_path) == before


def test_stores_lists_a_read_only_workdir(finished, tmp_path, monkeypatch):
    """Listing only reads: on a read-only mount it lists the stores (a missing work directory
    is one line and creates nothing: tests/test_cli.py)."""
    prefix = _namespace_or_skip()
    work = finished["work"]
    monkeypatch.setenv("MOUNT", f"mount --bind {work} {work} && "
                                f"mount -o remount,bind,ro {work}")
    before = _state(finished, tmp_path)
    done = _medfm("stores", "--workdir", str(work), prefix=prefix)
    assert done.returncode == 0, done.stderr
    assert "complete" in done.stdout and "Traceback" not in done.stderr
    assert _state(finished, tmp_path) == before


def test_disk_full_is_one_line(finished, tmp_path, monkeypatch):
    """A full 64 KiB tmpfs as the report folder (real ENOSPC)."""
    prefix = _namespace_or_skip()
    full = tmp_path / "full"
    full.mkdir()
    monkeypatch.setenv("MOUNT", f"mount -t tmpfs -o size=64k none {full} && "
                                f"dd if=/dev/zero of={full}/fill bs=4k count=64 2>/dev/null; true")
    before = _state(finished, tmp_path)
    done = _medfm("report", "--workdir", str(finished["work"]), "--out", str(full / "rep"),
                  prefix=prefix)
    _assert_one_line(done.returncode, done.stderr, "disk full")
    assert "finished work is kept" in done.stderr
    assert _state(finished, tmp_path) == before


def test_official_sizes_with_another_md5_warn_once(tmp_path, capsys):
    """A breastmnist.npz with the official split sizes but not the official bytes runs, with
    exactly one warning line naming both MD5s (it used to pass silently)."""
    data = tmp_path / "data"
    write_synthetic_npz(data, "breastmnist", 28, n=(546, 78, 156))  # INFO's split sizes
    argv = ["grid", str(_yaml(tmp_path / "g.yaml", "sizes: [28]\n", data)), "--dry-run",
            "--workdir", str(tmp_path / "work")]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "warning" in lines[0], lines
    assert "750601b1f35ba3300ea97c75c52ff8f6" in lines[0]  # the official MD5


def test_input_size_zero_is_refused_not_the_default():
    from medfm.errors import InvalidArgumentError
    from medfm.preprocess import resolve_preprocess

    for size in (0, -1):
        with pytest.raises(InvalidArgumentError, match="positive integer"):
            resolve_preprocess({"input_size": (3, 224, 224)}, input_size=size)


def test_a_probe_that_lost_the_insert_race_reports_nothing_fitted(finished, tmp_path, capsys,
                                                                  monkeypatch):
    """Another process recorded the run between this probe's registry query and its insert:
    the probe says 0 fitted, 1 already in the registry, and the registry keeps the first row.
    (The race is staged by answering the query as it was before the other insert landed.)"""
    from medfm.store.registry import Registry

    work = tmp_path / "work"
    shutil.copytree(finished["work"], work)
    rows = _registry_rows(work)
    monkeypatch.setattr(Registry, "done_keys", lambda self, keys: set())
    assert main(["probe", "--workdir", str(work), "--fractions", "1.0", "--seeds", "0",
                 "--quiet"]) == 0
    assert "0 run(s) fitted, 1 already in the registry" in capsys.readouterr().out
    assert _registry_rows(work) == rows


def test_grid_prints_its_job_count_before_it_runs(finished, tmp_path, capsys):
    """The finished fixture's grid (its store and its one probe row): the count comes first."""
    argv = ["grid", str(_yaml(tmp_path / "g.yaml", "sizes: [28]\n", finished["data"])),
            "--workdir", str(finished["work"]), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "grid: 0 job(s) to run, 2 already done", out


def test_grid_duplicates_collapse_to_one_job_per_run(finished, tmp_path, capsys):
    """Repeated values and other spellings of one dataset and backbone plan one job each (they
    planned 6 jobs for 1 row)."""
    body = ("sizes: [28, 28]\nfractions: [1.0, 1.0]\nseeds: [0, 0]\n"
            "methods: [logreg, logreg]\n")
    spec = _yaml(tmp_path / "g.yaml", body, finished["data"]).read_text().replace(
        "datasets: [breastmnist]", "datasets: [breastmnist, BreastMNIST]").replace(
        "backbones: [test_efficientnet]",
        "backbones: [test_efficientnet, test_efficientnet.r160_in1k]")
    (tmp_path / "g.yaml").write_text(spec)
    from medfm.grid import load_spec
    from medfm.grid.plan import plan_grid

    plan = plan_grid(load_spec(tmp_path / "g.yaml"), workdir=finished["work"])
    assert plan.total == {"extract": 1, "probe": 1, "finetune": 0}


def test_a_probe_state_copied_onto_another_runs_name_is_refused(finished, tmp_path):
    """The finished run's kept probe state (a real fit), copied onto another run's file name:
    reading it for that run is one line naming both runs; under its own name it loads."""
    from medfm.errors import StoreError
    from medfm.robust.score import load_state, state_path

    work = _work_copy(finished, tmp_path)
    (kept,) = (work / "probes").glob("*.npz")
    own = kept.stem
    other = "f" * len(own)
    shutil.copy2(kept, state_path(work, other))
    assert load_state(work, own) is not None
    with pytest.raises(StoreError, match=f"named for run {other} but holds run {own}"):
        load_state(work, other)


def test_a_corrupted_store_copied_onto_another_name_is_refused(finished, tmp_path):
    """A corrupted-split sibling's name ends in its request's digest, as a store's does."""
    import h5py

    from medfm.errors import StoreError
    from medfm.resolve.keys import store_digest
    from medfm.robust.stores import CorruptedStore

    identity = {"store": {"dataset": "breastmnist", "size": 28, "backbone": "test_efficientnet"},
                "pairs": [["pixelate", 1]], "seed": 0}
    named = tmp_path / f"s__c{store_digest(identity)}.h5"
    with h5py.File(named, "w") as fh:
        fh.attrs.update({"complete": True, "request_json": json.dumps(identity),
                         "fingerprint": "0" * 16, "pairs_json": "[]", "skipped_json": "[]"})
    CorruptedStore(named)  # under its own name it opens
    planted = tmp_path / f"s__c{'0' * 16}.h5"
    shutil.copy2(named, planted)
    with pytest.raises(StoreError, match=f"named for request {'0' * 16} but holds request"):
        CorruptedStore(planted)


def test_stores_verify_rechecks_what_the_verified_cache_vouches_for(finished, tmp_path, capsys):
    """`medfm stores` trusts its record of a verified store (size and mtime unchanged);
    `medfm stores --verify` reads every block again and shows the rotted store corrupt."""
    work = _rotted_store(finished, tmp_path)
    assert main(["stores", "--workdir", str(work)]) == 0
    assert "complete" in capsys.readouterr().out
    assert main(["stores", "--workdir", str(work), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "corrupt" in out and "complete" not in out


def test_a_store_written_before_checksums_still_reads_with_nothing_recomputed(finished,
                                                                              tmp_path, capsys):
    """A store without block checksums (as every store before them) is checked by its
    fingerprint as before, and its recorded run is found: nothing is refitted."""
    import h5py

    from medfm.store.features import CHECKSUM_ATTR, FeatureStore

    work = _work_copy(finished, tmp_path)
    with h5py.File(_only_store(work), "r+") as fh:
        for split in SPLITS:
            for name in ("features", "labels", "index"):
                del fh[split][name].attrs[CHECKSUM_ATTR]
    assert FeatureStore(_only_store(work)).labels("train").shape == (N_ROWS[0], 1)
    assert main(["probe", "--workdir", str(work), "--fractions", "1.0", "--seeds", "0",
                 "--quiet"]) == 0
    assert "0 run(s) fitted, 1 already in the registry" in capsys.readouterr().out


def _damage_registry_index(work: Path) -> None:
    """Flip 4 bytes of a cell pointer in the registry's results_by_run index page: the file
    opens and its rows read, but `PRAGMA quick_check` finds the page broken."""
    path = work / "registry.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master "
                               "WHERE name = 'results_by_run'").fetchone()
    with open(path, "r+b") as fh:
        fh.seek((root - 1) * page_size + 8)
        cell = fh.read(4)
        fh.seek((root - 1) * page_size + 8)
        fh.write(bytes(b ^ 0xFF for b in cell))


def test_a_registry_with_damaged_pages_is_refused_before_anything_is_written(finished,
                                                                             tmp_path):
    """A probe of a new run used to add its row to a damaged registry (exit 0) or die with
    sqlite3.IntegrityError; now: one line, exit 2, the file's bytes as they were."""
    work = _work_copy(finished, tmp_path)
    _damage_registry_index(work)
    registry = work / "registry.sqlite"
    before = hashlib.sha256(registry.read_bytes()).hexdigest()
    done = _medfm("probe", "--workdir", str(work), "--fractions", "0.5", "--seeds", "0",
                  "--quiet")
    _assert_one_line(done.returncode, done.stderr, "is damaged (quick_check: ")
    assert "nothing was written" in done.stderr
    assert hashlib.sha256(registry.read_bytes()).hexdigest() == before
    assert not (work / "probes").exists() or len(list((work / "probes").glob("*.npz"))) == 1


def test_results_read_a_read_only_registry(finished, tmp_path, monkeypatch):
    """A registry on a read-only mount (a lab's shared results) is read, not refused."""
    prefix = _namespace_or_skip()
    work = finished["work"]
    monkeypatch.setenv("MOUNT", f"mount --bind {work} {work} && "
                                f"mount -o remount,bind,ro {work}")
    before = _state(finished, tmp_path)
    done = _medfm("results", "--workdir", str(work), "--format", "csv", prefix=prefix)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 2 and "breastmnist" in done.stdout
    assert _state(finished, tmp_path) == before


FUZZ_POSITIONS = 500  # seeded sample of byte positions of the real BreastMNIST-28 npz


def test_a_flipped_byte_anywhere_in_a_real_npz_is_a_clean_load_or_one_medfm_error(real_root,
                                                                                  tmp_path):
    """Each of 500 seeded positions of the official breastmnist.npz (560 KB, deflated) flipped
    in turn: checking the file and loading every split either works or raises one MedfmError
    on one line (293 of 1,300 positions used to raise TokenError, zlib.error,
    NotImplementedError or OSError)."""
    from medfm.data import check_npz, load_split
    from medfm.errors import MedfmError

    original = (real_root / "breastmnist.npz").read_bytes()
    rng = np.random.default_rng(26)
    positions = np.sort(rng.choice(len(original), size=FUZZ_POSITIONS, replace=False))
    outcomes = {"clean": 0, "refused": 0}
    for i, position in enumerate(positions):
        folder = tmp_path / str(i)
        folder.mkdir()
        damaged = bytearray(original)
        damaged[position] ^= 0xFF
        (folder / "breastmnist.npz").write_bytes(damaged)
        try:
            check_npz(folder / "breastmnist.npz", "breastmnist", 28)
            for split in SPLITS:
                load_split("breastmnist", 28, split, folder, mmap=False)
            outcomes["clean"] += 1
        except MedfmError as exc:
            assert "\n" not in str(exc) and str(folder) in str(exc), (position, str(exc))
            outcomes["refused"] += 1
        shutil.rmtree(folder)
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == FUZZ_POSITIONS, outcomes


def test_skip_bad_skips_a_decompression_bomb_naming_the_limit(finished, tmp_path, capsys):
    src = _png_folder(finished["real"], tmp_path / "src")
    _png(src / "class0" / "bomb.png", 20000, 20000, rows=1)
    argv = _import(finished, tmp_path, "--skip-bad", "--split", "0.5,0.25,0.25")
    assert main(argv) == 0, capsys.readouterr().err
    (card,) = (tmp_path / "imported").glob("*.card.json")
    (skipped,) = json.loads(card.read_text())["skipped"]
    assert skipped["path"] == "class0/bomb.png" and "limit of 89,478,485" in skipped["reason"]


def _breast_folder(real: Path, folder: Path, n: int) -> Path:
    """The first `n` real BreastMNIST-28 training images as PNGs in class folders."""
    from PIL import Image

    with np.load(real / "breastmnist.npz") as npz:
        images, labels = npz["train_images"][:n], npz["train_labels"][:n, 0]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"class{label}" / f"{i:04d}.png")
    return folder


def test_two_imports_of_one_name_from_different_folders_take_turns(finished, tmp_path):
    """The second import of NAME (other images) waits for the first instead of deleting its
    work under it (the first died on its progress file); then it says NAME is taken."""
    root = tmp_path / "imported"
    first_src = _breast_folder(finished["real"], tmp_path / "a", 546)
    second_src = _breast_folder(finished["real"], tmp_path / "b", 200)
    argv = ["import", "shared", "--sizes", "28,64,128,224", "--data-root", str(root), "--quiet"]
    command = [sys.executable, "-m", "medfm", argv[0], argv[1]]
    first = subprocess.Popen([*command, str(first_src), *argv[2:]], stderr=subprocess.PIPE,
                             text=True, env=os.environ)
    deadline = time.monotonic() + 120
    while not (root / ".import-shared" / "progress.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # mid-import, until the second has had its go
    second = subprocess.Popen([*command, str(second_src), *argv[2:]], stderr=subprocess.PIPE,
                              text=True, env=os.environ)
    said = second.stderr.readline()  # the waiting line, or (unlocked) whatever it ends with
    first.send_signal(signal.SIGCONT)
    said += second.stderr.read()
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.wait(timeout=300) == 2, said
    assert said.startswith(f"waiting for pid {first.pid}, which is writing import shared"), said
    assert "already imported" in said and "Traceback" not in said
    card = json.loads((root / "shared.card.json").read_text())
    assert sum(card["n_samples"].values()) == 546


def test_an_import_rerun_removes_the_temp_files_a_killed_final_write_left(finished, tmp_path,
                                                                          capsys):
    root = tmp_path / "imported"
    root.mkdir()
    stale = [root / ".mybreast.npz.tmp-99999", root / ".mybreast_64.npz.tmp-12345"]
    other = root / ".mybreast2.npz.tmp-99999"  # another dataset's: not ours to remove
    for path in (*stale, other):
        path.write_bytes(b"\0" * 1024)
    assert main(_import(finished, tmp_path, "--split", "0.5,0.25,0.25")) == 0
    assert not any(path.exists() for path in stale) and other.exists()


def _dicom_classes(folder: Path, name: str, n: int = 3) -> Path:
    """Two class folders of `n` copies each of pydicom's own test file `name`."""
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file(name))
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shutil.copy(source, folder / label / f"{i}.dcm")
    return folder


def test_a_ct_without_a_window_maps_a_fixed_hu_range_with_one_warning(tmp_path, capsys):
    """pydicom's CT_small.dcm (int16, rescaled to HU, no VOI LUT or window) used 8 of the 256
    gray levels (the whole int16 range mapped); now HU -1024..3071, one warning naming how many
    files took that default, recorded in the card."""
    pytest.importorskip("pydicom")
    from medfm.data import load_split

    src = _dicom_classes(tmp_path / "src", "CT_small.dcm")
    root = tmp_path / "root"
    assert main(["import", "myct", str(src), "--sizes", "64", "--split", "0.34,0.33,0.33",
                 "--data-root", str(root), "--quiet"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "warning: 6 CT DICOM file(s) have no window" in lines[0], lines
    images, _ = load_split("myct", 64, "train", root)
    assert len(np.unique(images)) > 64  # was 8 levels (128..135)
    card = json.loads((root / "myct.card.json").read_text())
    assert card["intensity"]["files_with_default_window"] == 6
    assert card["intensity"]["dicom_window"] is None


def test_window_option_maps_every_dicom_through_it(tmp_path, capsys):
    pytest.importorskip("pydicom")
    from medfm.imported.images import decode

    src = _dicom_classes(tmp_path / "src", "CT_small.dcm")
    root = tmp_path / "root"
    assert main(["import", "myct", str(src), "--window", "40,400", "--sizes", "64",
                 "--split", "0.34,0.33,0.33", "--data-root", str(root), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    card = json.loads((root / "myct.card.json").read_text())
    assert card["intensity"]["dicom_window"] == [40.0, 400.0]
    assert card["intensity"]["files_with_default_window"] == 0
    raw = decode(src / "a" / "0.dcm", (src / "a" / "0.dcm").read_bytes(), window=(40, 400))
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(src / "a" / "0.dcm")
    hu = apply_modality_lut(ds.pixel_array, ds)
    expected = np.clip(np.rint((hu - (40 - 200)) * (255 / 400)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(raw.pixels, expected)


@pytest.mark.parametrize("window", ["40", "40,0", "nan,400"])
def test_a_bad_window_is_one_line(window, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    code = main(["import", "myct", str(src), "--window", window, "--data-root",
                 str(tmp_path / "root"), "--quiet"])
    _assert_one_line(code, capsys.readouterr().err, "--window")
    assert not (tmp_path / "root").exists()


def test_every_encoding_of_mr_small_imports_to_the_same_pixels():
    """Big endian, implicit VR, RLE, JPEG 2000 / JPEG-LS lossless, padded: one image (kept)."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from medfm.imported.images import decode

    names = ["MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
             "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_padded.dcm"]
    decoded = [decode(Path(p), Path(p).read_bytes()) for p in map(get_testdata_file, names)]
    assert all(not d.default_window for d in decoded)  # MR: its stored bits, as before
    for other in decoded[1:]:
        np.testing.assert_array_equal(other.pixels, decoded[0].pixels)


def test_a_value_json_refuses_is_named_by_its_field_not_quoted_whole():
    """The error used to quote a whole recipe (660 characters)."""
    from medfm.errors import InvalidArgumentError
    from medfm.resolve.keys import canonical_json

    recipe = {f"field_{i}": i for i in range(40)} | {"lora": {"alpha": float("inf")}}
    with pytest.raises(InvalidArgumentError) as refused:
        canonical_json(recipe)
    assert str(refused.value).startswith("cannot store lora.alpha=inf as JSON")
    assert len(str(refused.value)) < 200


def _no_gpu() -> None:
    from medfm.runtime import cuda_available

    if cuda_available():
        pytest.skip("a GPU is visible: --device cuda works here")


CREATES_NOTHING = {  # verb argv in a fresh work directory W -> (expected exit code, needs no GPU)
    "extract-device-cuda": (lambda f, w, t: [*_extract_from(f["data"], w), "--device", "cuda"],
                            2, True),
    "finetune-device-cuda": (lambda f, w, t: _finetune(f, "--device", "cuda", work=w), 2, True),
    "grid-dry-run": (lambda f, w, t: ["grid", str(_yaml(t / "g.yaml", "sizes: [28]\n",
                                                        f["data"])),
                                      "--dry-run", "--workdir", str(w)], 0, False),
    "grid-unreadable-weights": (
        lambda f, w, t: ["grid", str(_yaml(t / "g.yaml", "sizes: [28]\n", f["data"],
                                           weights=_pickled_weights(t))),
                         "--workdir", str(w), "--quiet"], 2, False),
    "probe-nothing-extracted": (lambda f, w, t: ["probe", "--workdir", str(w), "--quiet"], 2,
                                False),
    "stores-nothing-extracted": (lambda f, w, t: ["stores", "--workdir", str(w)], 0, False),
}


@pytest.mark.parametrize("row", sorted(CREATES_NOTHING))
def test_a_command_that_fails_or_only_reads_creates_nothing(row, finished, tmp_path, capsys):
    """No registry, stores folder, lock or checkpoint folder is left by a command that fails
    (a missing GPU, an unreadable weights file) or only reads (--dry-run, stores)."""
    make_argv, expected, gpu_row = CREATES_NOTHING[row]
    if gpu_row:
        _no_gpu()
    work = tmp_path / "w"
    work.mkdir()
    argv = make_argv(finished, work, tmp_path)
    assert main(argv) == expected, capsys.readouterr().err
    assert list(work.iterdir()) == []


def test_report_md_quotes_an_odd_work_directory_name_as_code(finished, tmp_path):
    """A work directory named with Markdown and HTML in it (and a newline) stays text."""
    odd = tmp_path / "lab *x*_[a](b) <script>\n`tick`"
    shutil.copytree(finished["work"], odd)
    assert main(["report", "--workdir", str(odd), "--out", str(tmp_path / "rep")]) == 0
    note = (tmp_path / "rep" / "report.md").read_text().split("\n\n")[1]
    assert note.startswith("1 runs from `` ") and "<script>\\n`tick`/registry.sqlite ``" in note
