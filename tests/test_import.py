"""Issue 11: your own images. Real BreastMNIST / PneumoniaMNIST exported to PNG folders, CSVs and
DICOM files (8-bit, 16-bit, MONOCHROME1) inside the tests, imported, and compared with the
originals and with the MedMNIST route."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfm.cli import main
from medfm.data import get_dataset, load_split, resolve_dataset
from medfm.errors import InvalidDataFileError
from medfm.extract import extract
from medfm.imported import import_dataset
from medfm.probe import probe
from medfm.store.features import FeatureStore

SPLITS = ("train", "val", "test")
TINY = dict(backbone="test_resnet", weights="random", input_size=32)


@pytest.fixture(scope="module")
def breast(real_root):
    with np.load(real_root / "breastmnist.npz") as npz:
        return {k: npz[k] for k in npz.files}


def export_folder(arrays: dict, root: Path, *, rgb: bool = False) -> Path:
    """SOURCE/{train,val,test}/<class>/<index>.png"""
    for split in SPLITS:
        for i, (image, label) in enumerate(zip(arrays[f"{split}_images"],
                                               arrays[f"{split}_labels"][:, 0], strict=True)):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_rgb(image) if rgb else image).save(folder / f"{i:05d}.png")
    return root


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.stack([image, 255 - image, image // 2], axis=-1)


def export_csv(arrays: dict, root: Path) -> Path:
    """Flat PNGs and labels.csv (path,label,split) in the npz's row order."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        for split in SPLITS:
            for i, (image, label) in enumerate(zip(arrays[f"{split}_images"],
                                                   arrays[f"{split}_labels"][:, 0], strict=True)):
                name = f"img/{split}_{i:05d}.png"
                (root / name).parent.mkdir(exist_ok=True)
                Image.fromarray(image).save(root / name)
                writer.writerow([name, f"class{label}", split])
    return root / "labels.csv"


def _folder_order(labels: np.ndarray) -> np.ndarray:
    """Rows in the order an ImageFolder import lists them: by class folder, then index."""
    return np.lexsort((np.arange(len(labels)), labels[:, 0]))


def test_png_folder_import_keeps_real_pixels_and_labels(breast, tmp_path):
    src = export_folder(breast, tmp_path / "src")
    result = import_dataset("mybreast", src, sizes=(28, 64), data_root=tmp_path / "root",
                            progress=False)
    assert result.status == "imported"
    assert result.counts == {"train": 546, "val": 78, "test": 156}
    for split in SPLITS:
        images, labels = load_split("mybreast", 28, split, tmp_path / "root")
        order = _folder_order(breast[f"{split}_labels"])
        np.testing.assert_array_equal(images, breast[f"{split}_images"][order])
        np.testing.assert_array_equal(labels, breast[f"{split}_labels"][order])
        assert load_split("mybreast", 64, split, tmp_path / "root")[0].shape[1:] == (64, 64)
    card = json.loads(result.card.read_text())
    assert card["task"] == "binary-class" and card["label_names"] == ["class0", "class1"]
    assert card["splits"]["method"] == "folders" and card["n_channels"] == 1
    assert card["counts"]["train"] == {"class0": 147, "class1": 399}
    assert len(card["source"]["sha256"]) == 64 and card["skipped"] == []
    info = get_dataset("mybreast")
    assert info.imported and info.n_samples == result.counts
    again = import_dataset("mybreast", src, sizes=(28, 64), data_root=tmp_path / "root",
                           progress=False)
    assert again.status == "exists"


def test_csv_import_gives_the_medmnist_route_features_and_metrics(breast, real_root, tmp_path):
    """Rows keep the CSV's order, so the imported file holds the original arrays exactly:
    extraction and probing then give the same features and metrics as the MedMNIST file."""
    labels_csv = export_csv(breast, tmp_path / "src")
    import_dataset("breastcsv", tmp_path / "src", labels_csv=labels_csv, sizes=(28,),
                   data_root=tmp_path / "root", progress=False)
    for split in SPLITS:
        images, labels = load_split("breastcsv", 28, split, tmp_path / "root")
        np.testing.assert_array_equal(images, breast[f"{split}_images"])
        np.testing.assert_array_equal(labels, breast[f"{split}_labels"])
    work = tmp_path / "work"
    ours = extract(dataset="breastcsv", size=28, data_root=tmp_path / "root", workdir=work,
                   progress=False, **TINY)
    theirs = extract(dataset="breastmnist", size=28, data_root=real_root, workdir=work,
                     progress=False, **TINY)
    assert ours.path != theirs.path
    a, b = FeatureStore(ours.path), FeatureStore(theirs.path)
    for split in SPLITS:
        np.testing.assert_array_equal(a.features(split), b.features(split))
    rows = {}
    for name in ("breastcsv", "breastmnist"):
        report = probe(dataset=name, fractions=(0.1, 1.0), seeds=(0,), workdir=work,
                       progress=False)
        rows[name] = sorted((r.key.fraction, r.chosen_C, r.acc, r.auc) for r in report.computed)
    assert rows["breastcsv"] == rows["breastmnist"] and len(rows["breastcsv"]) == 2


def _write_dicom(path: Path, pixels: np.ndarray, *, bits: int = 8, monochrome1: bool = False,
                 window: tuple[float, float] | None = None) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    stored = pixels.astype(np.uint16 if bits > 8 else np.uint8)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_8bit_16bit_and_monochrome1_map_back_to_the_original_pixels(breast, tmp_path):
    """train: 8-bit MONOCHROME2; val: 16-bit (v * 257, the full 16-bit range); test:
    MONOCHROME1 (stored inverted), no suffix (found by the DICM magic). The recorded rule maps
    every one back to the original uint8 image."""
    src = tmp_path / "dicom"
    for split in SPLITS:
        for i, (image, label) in enumerate(zip(breast[f"{split}_images"],
                                               breast[f"{split}_labels"][:, 0], strict=True)):
            folder = src / split / ("malignant", "benign")[label]
            folder.mkdir(parents=True, exist_ok=True)
            if split == "train":
                _write_dicom(folder / f"{i:05d}.dcm", image)
            elif split == "val":
                _write_dicom(folder / f"{i:05d}.dcm", image.astype(np.uint16) * 257, bits=16)
            else:
                _write_dicom(folder / f"{i:05d}", 255 - image, monochrome1=True)
    result = import_dataset("breastdcm", src, sizes=(28,), data_root=tmp_path / "root",
                            progress=False)
    for split in SPLITS:
        images, labels = load_split("breastdcm", 28, split, tmp_path / "root")
        order = _folder_order(1 - breast[f"{split}_labels"])  # "benign" (1) sorts first
        np.testing.assert_array_equal(images, breast[f"{split}_images"][order])
        np.testing.assert_array_equal(1 - labels, breast[f"{split}_labels"][order])
    card = json.loads(result.card.read_text())
    assert "MONOCHROME1 inverted" in card["intensity"]["dicom"]


def test_dicom_window_is_applied_before_mapping(tmp_path):
    """A 12-bit image with a window: values below/above it go to 0/255, the window spans 0..255
    (DICOM's LINEAR function, pydicom's apply_voi_lut)."""
    src = tmp_path / "src"
    values = np.tile(np.array([0, 1000, 1500, 2000, 4095], dtype=np.uint16), (5, 1))
    for label in ("a", "b"):
        for i in range(3):
            (src / label).mkdir(parents=True, exist_ok=True)
            _write_dicom(src / label / f"{i}.dcm", np.pad(values, ((0, 0), (0, 0))), bits=12,
                         window=(1500, 1001))
    import_dataset("windowed", src, sizes=(28,), data_root=tmp_path / "root", progress=False,
                   split=(0.34, 0.33, 0.33))
    images, _ = load_split("windowed", 28, "train", tmp_path / "root")
    # the 5 x 5 image was resized to 28; its centre column (1500) maps to the window's middle
    raw = _decoded(src / "a" / "0.dcm")
    np.testing.assert_array_equal(raw[0], [0, 0, 128, 255, 255])
    assert images.shape[1:] == (28, 28)


def _decoded(path: Path) -> np.ndarray:
    from medfm.imported.images import decode

    return decode(path, path.read_bytes()).pixels


def test_rgb_collection_stays_three_channels(breast, tmp_path):
    src = export_folder(breast, tmp_path / "src", rgb=True)
    import_dataset("breastrgb", src, sizes=(28,), data_root=tmp_path / "root", progress=False)
    images, _ = load_split("breastrgb", 28, "test", tmp_path / "root")
    order = _folder_order(breast["test_labels"])
    np.testing.assert_array_equal(images, _rgb(breast["test_images"][order]))
    assert get_dataset("breastrgb").n_channels == 3


def test_multilabel_csv(breast, tmp_path):
    root = tmp_path / "src"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "effusion", "nodule", "edema"])
        for i, image in enumerate(breast["train_images"][:120]):
            Image.fromarray(image).save(root / "img" / f"{i}.png")
            writer.writerow([f"img/{i}.png", *rng.integers(0, 2, 3)])
    result = import_dataset("mlcsv", root, labels_csv=root / "labels.csv", sizes=(28,),
                            data_root=tmp_path / "out", progress=False, seed=3)
    info = get_dataset("mlcsv")
    assert info.task.value == "multi-label, binary-class"
    assert info.label_names == ("effusion", "nodule", "edema")
    assert sum(result.counts.values()) == 120
    _, labels = load_split("mlcsv", 28, "val", tmp_path / "out")
    assert labels.shape == (result.counts["val"], 3) and set(np.unique(labels)) <= {0, 1}


def _group_csv(root: Path, breast: dict, *, split_column: bool = False) -> Path:
    """120 images of 30 patients (4 each, one label per patient)."""
    (root / "img").mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "group"] + (["split"] if split_column else []))
        for i, image in enumerate(breast["train_images"][:120]):
            Image.fromarray(image).save(root / "img" / f"{i}.png")
            patient = i // 4
            row = [f"img/{i}.png", "tumour" if patient % 3 == 0 else "normal", f"p{patient}"]
            if split_column:
                row.append("test" if i == 5 else ("train", "val", "test")[patient % 3])
            writer.writerow(row)
    return root / "labels.csv"


def test_group_column_forces_patient_level_splits(breast, tmp_path):
    labels_csv = _group_csv(tmp_path / "src", breast)
    result = import_dataset("bypatient", tmp_path / "src", labels_csv=labels_csv, sizes=(28,),
                            data_root=tmp_path / "root", progress=False, seed=7)
    card = json.loads(result.card.read_text())
    assert card["splits"]["group_level"] and card["splits"]["unit"] == "group"
    # which patient each row of each split came from: recover it from the pixels
    patient_of = {breast["train_images"][i].tobytes(): i // 4 for i in range(120)}
    seen = {}
    for split in SPLITS:
        images, _ = load_split("bypatient", 28, split, tmp_path / "root")
        for image in images:
            seen.setdefault(patient_of[image.tobytes()], set()).add(split)
    assert len(seen) == 30 and all(len(s) == 1 for s in seen.values())
    assert all(result.counts[s] > 0 for s in SPLITS)
    # the same seed gives the same split; another seed another
    again = import_dataset("bypatient2", tmp_path / "src", labels_csv=labels_csv, sizes=(28,),
                           data_root=tmp_path / "root", progress=False, seed=7)
    assert again.counts == result.counts


def test_a_group_straddling_fixed_splits_is_one_line(breast, tmp_path, capsys):
    labels_csv = _group_csv(tmp_path / "src", breast, split_column=True)
    code = main(["import", "leaky", str(tmp_path / "src"), "--labels", str(labels_csv),
                 "--data-root", str(tmp_path / "root"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "group 'p1'" in err[0] and "straddle" in err[0]
    assert not (tmp_path / "root").exists() or not list((tmp_path / "root").iterdir())


def _bad_folder(tmp_path: Path, breast: dict, kind: str) -> list[str]:
    """A small ImageFolder with one bad thing; returns extra CLI arguments."""
    src = tmp_path / "src"
    for label in ("a", "b"):
        (src / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(breast["train_images"][i]).save(src / label / f"{i}.png")
    extra: list[str] = []
    if kind == "truncated":
        data = (src / "a" / "0.png").read_bytes()
        (src / "a" / "0.png").write_bytes(data[: len(data) // 2])
    elif kind == "unsupported":
        (src / "b" / "notes.gif").write_bytes(b"GIF89a")
    elif kind == "few":
        (src / "c").mkdir()
        Image.fromarray(breast["train_images"][0]).save(src / "c" / "0.png")
    elif kind == "mixed":
        Image.fromarray(_rgb(breast["train_images"][0])).save(src / "b" / "rgb.png")
    elif kind in ("missing", "nolabel", "duplicate"):
        rows = [("a/0.png", "a"), ("a/1.png", "a"), ("b/0.png", "b"), ("b/1.png", "b")]
        rows += {"missing": [("b/9.png", "b")], "nolabel": [("b/2.png", "")],
                 "duplicate": [("a/0.png", "a")]}[kind]
        with open(tmp_path / "labels.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([("path", "label"), *rows])
        extra = ["--labels", str(tmp_path / "labels.csv")]
    return [str(src), *extra]


@pytest.mark.parametrize("kind, needle", [
    ("truncated", "0.png"), ("unsupported", "notes.gif"), ("few", "class 'c' has 1 images"),
    ("mixed", "--channels"), ("missing", "9.png: file not found"), ("nolabel", "no label"),
    ("duplicate", "listed twice"),
])
def test_bad_input_is_one_line_and_writes_nothing(kind, needle, breast, tmp_path, capsys):
    argv = _bad_folder(tmp_path, breast, kind)
    code = main(["import", "bad", *argv, "--data-root", str(tmp_path / "root"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert needle in err[0]
    root = tmp_path / "root"
    assert not root.exists() or not [p for p in root.iterdir() if not p.name.startswith(".")]


def test_skip_bad_lists_the_skipped_images_in_the_card(breast, tmp_path):
    argv = _bad_folder(tmp_path, breast, "truncated")
    result = import_dataset("skipped", argv[0], sizes=(28,), data_root=tmp_path / "root",
                            split=(0.34, 0.33, 0.33), skip_bad=True, progress=False)
    assert [s["path"] for s in result.skipped] == ["a/0.png"]
    assert sum(result.counts.values()) == 7
    card = json.loads(result.card.read_text())
    assert card["skipped"][0]["path"] == "a/0.png"


def test_interrupted_import_resumes_to_the_same_bytes(real_root, tmp_path):
    """A real import process SIGKILLed after some rows are committed; the rerun resumes and
    writes exactly the bytes of an uninterrupted import."""
    with np.load(real_root / "pneumoniamnist.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    src = export_folder(arrays, tmp_path / "src")
    cmd = [sys.executable, "-m", "medfm", "import", "pneu", str(src), "--sizes", "28,128",
           "--data-root", str(tmp_path / "killed"), "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    progress = tmp_path / "killed" / ".import-pneu" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and sum(json.loads(progress.read_text())["done"].values()) >= 1024:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "pneu.card.json").exists()
    resumed = import_dataset("pneu", src, sizes=(28, 128), data_root=tmp_path / "killed",
                             progress=False)
    assert resumed.status == "resumed"
    whole = import_dataset("pneu", src, sizes=(28, 128), data_root=tmp_path / "whole",
                           progress=False)
    assert whole.status == "imported"
    for name in ("pneu.npz", "pneu_128.npz"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not (tmp_path / "killed" / ".import-pneu").exists()
    ref = resolve_dataset("pneu", 28, tmp_path / "whole")
    assert ref.digest == json.loads((tmp_path / "whole" / "pneu.card.json").read_text())[
        "sizes"]["28"]["md5"]


def test_datasets_verb_lists_medmnist_and_imported(breast, tmp_path, capsys):
    export_folder(breast, tmp_path / "src")
    import_dataset("listed", tmp_path / "src", sizes=(28,), data_root=tmp_path / "root",
                   progress=False)
    assert main(["datasets", "--data-root", str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out
    assert "listed" in out and "breastmnist" in out and "imported" in out


def test_reimport_with_other_options_needs_force(breast, tmp_path):
    src = export_folder(breast, tmp_path / "src")
    import_dataset("again", src, sizes=(28,), data_root=tmp_path / "root", progress=False)
    with pytest.raises(Exception, match="--force"):
        import_dataset("again", src, sizes=(28, 64), data_root=tmp_path / "root",
                       progress=False)
    result = import_dataset("again", src, sizes=(28, 64), data_root=tmp_path / "root",
                            progress=False, force=True)
    assert result.status == "imported"
    with pytest.raises(InvalidDataFileError):
        import_dataset("nothing", tmp_path / "missing", data_root=tmp_path / "root",
                       progress=False)


def test_grid_finetune_and_report_run_on_an_imported_dataset(breast, tmp_path):
    """The whole pipeline on an imported name: a grid (extract, logreg, fine-tune) through the
    local executor's spawned workers, then the report."""
    from medfm.grid import run_grid, spec_from_dict
    from medfm.report import report

    export_folder(breast, tmp_path / "src")
    import_dataset("mine", tmp_path / "src", sizes=(28,), data_root=tmp_path / "root",
                   progress=False)
    spec = spec_from_dict({
        "datasets": ["mine"], "sizes": [28], "backbones": ["test_resnet"], "weights": "random",
        "fractions": [1.0], "seeds": [0], "methods": ["logreg", "finetune"],
        "resize_policy": "native", "device": "cpu", "data_root": str(tmp_path / "root"),
        "finetune": {"recipe": "medfm", "overrides": {"epochs": 1, "batch_size": 64,
                                                      "augment": False}}})
    result = run_grid(spec, workdir=tmp_path / "work", executor="local", progress=False,
                      max_workers=1)
    assert result.ok and result.rows_added == 2, result.failed
    out = report(workdir=tmp_path / "work", out=tmp_path / "report")
    assert "mine" in (tmp_path / "report" / "report.html").read_text()
    assert out is not None


def test_task_ordinal_keeps_the_class_order(breast, tmp_path):
    """`--task ordinal`: grades in natural order of their names, scored as MedMNIST scores
    ordinal tasks; a binary/multi-class collection stays as it is without it."""
    src = tmp_path / "src"
    for grade in ("grade1", "grade2", "grade10"):
        (src / grade).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(breast["train_images"][i]).save(src / grade / f"{i}.png")
    import_dataset("graded", src, sizes=(28,), task="ordinal", data_root=tmp_path / "root",
                   split=(0.34, 0.33, 0.33), progress=False)
    info = get_dataset("graded")
    assert info.task.value == "ordinal-regression"
    assert info.label_names == ("grade1", "grade2", "grade10")  # natural, not lexical, order
    with pytest.raises(SystemExit) as exit_:  # argparse choices: one line, exit 2
        main(["import", "graded2", str(src), "--task", "bogus", "--data-root",
              str(tmp_path / "root"), "--quiet"])
    assert exit_.value.code == 2
