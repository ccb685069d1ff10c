"""Your own images: import any labelled image collection as a dataset medfm treats like a
MedMNIST flag (`medfm import NAME SOURCE`).

    from medfm.imported import import_dataset
    import_dataset("myus", "scans/", sizes=(28, 224))                 # SOURCE/<class>/...
    import_dataset("mycxr", "dicoms/", labels_csv="labels.csv", split=(0.7, 0.1, 0.2))

What it writes, under the data root (read back by the dataset source medfm.datasources.cards):
`NAME.npz` (28 px) and `NAME_{64,128,224}.npz` in the MedMNIST layout (`{split}_images` uint8
(N, S, S) or (N, S, S, 3), `{split}_labels` uint8 (N, 1) or (N, L)), and the dataset card
`NAME.card.json`: task, class names, counts per split and class, how the splits were made, the
resize and intensity rules, the source files' digest (sha256 over every file's sha256, in row
order) and the images skipped. The card is written last, so a
dataset without its card does not exist for medfm; the npz members are stored uncompressed
(memory-mapped as they are) with fixed zip timestamps, so the same images always give the same
bytes (and the same data digest in every run's identity).

Large collections stream: images are decoded by a thread pool, in order, straight into
memory-mapped arrays in `DATA_ROOT/.import-NAME/`, whose progress file is moved only after the
rows are flushed; an interrupted import resumes there (or restarts if the source or options
changed), and the finished npz files are renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medfm.cache import file_digest, write_atomic
from medfm.datasources.cards import CARD_FORMAT, CARD_SUFFIX, read_card, register_card
from medfm.datasources.info import SIZES, SPLITS, Task, check_size
from medfm.datasources.medmnist import DATASETS
from medfm.errors import InvalidArgumentError, InvalidDataFileError, MedfmError, MedfmWarning
from medfm.imported.images import (CT_HU_RANGE, DICOM_DEFAULT, RULES, ImageReadError, _dicom,
                                   decode, is_dicom, open_image, resize_square, to_channels)
from medfm.imported.source import (
    Source,
    SourceError,
    assign_splits,
    check_classes,
    check_files,
    check_split,
    file_head,
    read_csv,
    read_folder,
    split_counts,
)
from medfm.limits import WORKERS_MAX, check_at_most, check_seed
from medfm.locks import exclusive_lock
from medfm.paths import resolve_data_root

DEFAULT_SIZES = (28, 224)
DEFAULT_SPLIT = (0.7, 0.1, 0.2)
WORK_PREFIX = ".import-"  # DATA_ROOT/.import-NAME: arrays of an import in progress
LOCKS_DIRNAME = ".locks"  # DATA_ROOT/.locks/import-NAME.lock: one import of NAME at a time
FLUSH_ROWS = 512  # rows between flushes of the arrays and the progress file
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: same images, same npz bytes
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{1,63}$")
TASKS = ("auto", "ordinal")


@dataclass(frozen=True)
class ImportResult:
    """What one import did."""

    name: str
    card: Path
    status: str  # "imported", "resumed" or "exists"
    counts: dict  # split -> images
    skipped: list  # [{"path", "reason"}]
    images_per_s: float


def card_path(name: str, data_root: str | os.PathLike | None = None) -> Path:
    return resolve_data_root(data_root) / f"{name}{CARD_SUFFIX}"


def _check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise InvalidArgumentError(
            f"dataset name {name!r} must be 2-64 characters of a-z, 0-9, '_' or '-', starting "
            "with a letter.")
    if name in DATASETS:
        raise InvalidArgumentError(f"{name!r} is a MedMNIST dataset; choose another name.")
    return name


def _task(source: Source, task: str) -> Task:
    if task not in TASKS:
        raise InvalidArgumentError(f"--task {task!r} is not one of {', '.join(TASKS)}.")
    if source.multi_label:
        if task == "ordinal":
            raise InvalidArgumentError("--task ordinal needs one label per image, not 0/1 "
                                       "label columns.")
        return Task.MULTI_LABEL
    if len(source.label_names) < 2:
        raise SourceError(f"the collection has {len(source.label_names)} class; at least 2 "
                          "are needed.")
    if task == "ordinal":
        return Task.ORDINAL
    return Task.BINARY if len(source.label_names) == 2 else Task.MULTI_CLASS


def _plan_digest(source: Source, options: dict) -> str:
    """What the arrays depend on: every file (path, size, mtime), label, split and the
    options; an import resumes only into the same plan."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for it in source.items:
        stat = it.path.stat()
        digest.update(f"{it.rel}|{stat.st_size}|{stat.st_mtime_ns}|{it.label}|{it.split}|"
                      f"{it.group}\n".encode())
    return digest.hexdigest()[:16]


def _channels(source: Source, channels: int | None) -> int:
    """1 or 3: what every image of the collection becomes (headers only, no decoding)."""
    if channels is not None:
        if channels not in (1, 3):
            raise InvalidArgumentError(f"--channels {channels} must be 1 or 3.")
        return channels
    gray = color = None
    for it in source.items:
        kind = _header_kind(it.path, file_head(it.path))
        if kind == "color":
            color = color or it
        elif kind == "gray":
            gray = gray or it
        if gray and color:
            raise SourceError(
                f"the collection mixes grayscale ({gray.rel}) and colour ({color.rel}) images; "
                "pass --channels 1 (colour to luminance) or --channels 3 (gray replicated).")
    return 3 if color else 1


def _header_kind(path: Path, head: bytes) -> str | None:
    """"gray", "color" or None (unknown until decoded) from the file header alone."""
    if is_dicom(path, head):
        try:
            ds = _dicom().dcmread(path, stop_before_pixels=True, force=True)
            return "color" if int(ds.get("SamplesPerPixel", 1)) == 3 else "gray"
        except MedfmError:
            raise
        except Exception:  # noqa: BLE001 - a bad file is reported when decoded
            return None
    try:
        with open_image(path) as image:
            mode = image.mode
    except Exception:  # noqa: BLE001 - a bad file is reported when decoded
        return None
    if mode == "P":
        return None  # palette: colour unless every entry is gray; decided when decoded
    return "color" if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV") else "gray"


class _Work:
    """The arrays of an import in progress: DATA_ROOT/.import-NAME/."""

    def __init__(self, folder: Path, plan: str, sizes: tuple[int, ...], channels: int,
                 counts: dict[str, int], force: bool):
        self.folder, self.plan = folder, plan
        state = None
        progress = folder / "progress.json"
        if folder.exists() and not force:
            try:
                state = json.loads(progress.read_text())
            except (OSError, ValueError):
                state = None
            if not state or state.get("plan") != plan:
                state = None
        if state is None:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            state = {"plan": plan, "done": dict.fromkeys(SPLITS, 0), "bad": []}
            self.resumed = False
        else:
            self.resumed = any(state["done"].values())
        self.state = state
        self.arrays = {}
        for size in sizes:
            for split in SPLITS:
                shape = (counts[split], size, size) + ((3,) if channels == 3 else ())
                path = folder / f"{size}_{split}.npy"
                mode = "r+" if path.exists() and self.resumed else "w+"
                self.arrays[(size, split)] = np.lib.format.open_memmap(
                    path, mode=mode, dtype=np.uint8, shape=shape)
        self.digests = {}  # split -> (N, 32) sha256 of each source file, row by row
        for split in SPLITS:
            path = folder / f"sha256_{split}.npy"
            mode = "r+" if path.exists() and self.resumed else "w+"
            self.digests[split] = np.lib.format.open_memmap(
                path, mode=mode, dtype=np.uint8, shape=(counts[split], 32))

    def commit(self) -> None:
        for array in [*self.arrays.values(), *self.digests.values()]:
            array.flush()
        write_atomic(self.folder / "progress.json", json.dumps(self.state))


def _read_one(item, channels: int, sizes: tuple[int, ...], window: tuple[float, float] | None):
    """(sha256 of the file, {size: pixels}, took the default window) or (None, error text,
    False)."""
    try:
        data = item.path.read_bytes()
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})", False
    try:
        decoded = decode(item.path, data, window=window)
    except ImageReadError as exc:
        return None, str(exc), False
    pixels = to_channels(decoded.pixels, channels)
    if min(pixels.shape[:2]) < 1:
        return None, "has no pixels", False
    return (hashlib.sha256(data).digest(), {s: resize_square(pixels, s) for s in sizes},
            decoded.default_window)


def import_dataset(
    name: str,
    source: str | os.PathLike,
    *,
    labels_csv: str | os.PathLike | None = None,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    task: str = "auto",
    split: tuple[float, float, float] = DEFAULT_SPLIT,
    seed: int = 0,
    channels: int | None = None,
    skip_bad: bool = False,
    data_root: str | os.PathLike | None = None,
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
    window: tuple[float, float] | None = None,
) -> ImportResult:
    """Import SOURCE as dataset NAME (module docstring); one-line MedfmErrors for bad input.
    `window` (center, width) maps every grayscale DICOM (medfm.imported.images)."""
    name = _check_name(name)
    if window is not None and (len(window) != 2 or not all(map(math.isfinite, window))
                               or window[1] <= 0):
        raise InvalidArgumentError(f"--window {','.join(map(str, window))} must be CENTER,WIDTH: "
                                   "two finite numbers, the width > 0 (e.g. 40,400 for CT soft "
                                   "tissue).")
    seed = check_seed(seed, "--seed")
    if workers is not None:
        check_at_most(workers, WORKERS_MAX, "--workers", minimum=1)
    sizes = tuple(sorted({check_size(s) for s in sizes}))
    if not sizes:
        raise InvalidArgumentError(f"--sizes needs at least one of {SIZES}.")
    root = resolve_data_root(data_root)
    src = Path(source).expanduser().resolve()
    try:
        split = check_split(tuple(float(f) for f in split))
        found = (read_csv(src, Path(labels_csv).expanduser()) if labels_csv
                 else read_folder(src))
        skipped = check_files(found, skip_bad)
        splits_made = assign_splits(found, split, seed)
        if not found.items:
            raise SourceError(f"no image left to import from {src}.")
        check_classes(found)
        task_type = _task(found, task)
        n_channels = _channels(found, channels)
    except SourceError as exc:
        raise InvalidDataFileError(str(exc)) from None
    options = {"sizes": sizes, "channels": n_channels, "task": task_type.value,
               "splits": splits_made, "rules": RULES, "resize": "center-crop, PIL bicubic",
               "skipped": skipped}
    if window is not None or any(is_dicom(it.path, file_head(it.path)) for it in found.items):
        options["dicom"] = {"window": window, "no_window": DICOM_DEFAULT}  # (absent before)
    plan = _plan_digest(found, options)
    # one import of NAME at a time: a second (of other images too) waits, then finds it done or
    # says it needs --force; the holder alone may clear what killed imports of NAME left
    with exclusive_lock(root / LOCKS_DIRNAME / f"import-{name}.lock", label=f"import {name}"):
        _remove_stale_temps(root, name)
        card_file = root / f"{name}{CARD_SUFFIX}"
        if card_file.exists() and not force:
            card = read_card(card_file)
            if card.get("plan") == plan:
                return ImportResult(name, card_file, "exists", card["n_samples"], card["skipped"],
                                    0.0)
            raise InvalidArgumentError(
                f"a dataset named {name!r} is already imported in {root} from other images or "
                "options; pass --force to replace it, or choose another name.")
        root.mkdir(parents=True, exist_ok=True)
        by_split = {s: [it for it in found.items if it.split == s] for s in SPLITS}
        work = _Work(root / f"{WORK_PREFIX}{name}", plan, sizes, n_channels,
                     {s: len(v) for s, v in by_split.items()}, force)
        started, decoded = time.perf_counter(), 0
        total = sum(map(len, by_split.values()))
        bar = tqdm(total=total, initial=sum(work.state["done"].values()), unit="img",
                   disable=not progress, desc=f"import {name}", dynamic_ncols=True)
        bad = {b["path"] for b in work.state["bad"]}
        with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 1)) as pool:
            for split in SPLITS:
                items = by_split[split]
                start = work.state["done"][split]
                chunk_rows = max(FLUSH_ROWS, 4 * (workers or 4))
                for lo in range(start, len(items), chunk_rows):
                    chunk = items[lo:lo + chunk_rows]
                    for offset, (item, (digest, result, default)) in enumerate(zip(
                            chunk, pool.map(lambda it: _read_one(it, n_channels, sizes, window),
                                            chunk), strict=True)):
                        work.state["default_window"] = (work.state.get("default_window", 0)
                                                        + int(default))
                        if digest is None:
                            if not skip_bad:
                                raise InvalidDataFileError(
                                    f"{item.path}: {result}; fix or remove it, or pass --skip-bad "
                                    "to skip such images (they are listed in the dataset card).")
                            if item.rel not in bad:
                                work.state["bad"].append({"path": item.rel, "reason": result,
                                                          "split": split, "row": lo + offset})
                                bad.add(item.rel)
                            continue
                        for size in sizes:
                            work.arrays[(size, split)][lo + offset] = result[size]
                        work.digests[split][lo + offset] = np.frombuffer(digest, np.uint8)
                    decoded += len(chunk)
                    work.state["done"][split] = lo + len(chunk)
                    work.commit()
                    bar.update(len(chunk))
        bar.close()
        wall = time.perf_counter() - started
        labels = {s: np.array([it.label for it in by_split[s]], dtype=np.uint8).reshape(
            len(by_split[s]), -1) for s in SPLITS}
        dropped = {s: {b["row"] for b in work.state["bad"] if b["split"] == s} for s in SPLITS}
        keep = {s: np.setdiff1d(np.arange(len(by_split[s])), sorted(dropped[s])) for s in SPLITS}
        for item in (it for s in SPLITS for i, it in enumerate(by_split[s]) if i in dropped[s]):
            found.items.remove(item)
        counts = {s: int(len(keep[s])) for s in SPLITS}
        if not all(counts.values()):
            raise InvalidDataFileError(f"after skipping bad images, a split is empty ({counts}); "
                                       "fix the images or the splits.")
        check_classes(found)
        n_default = work.state.get("default_window", 0)
        if n_default:
            warnings.warn(MedfmWarning(
                f"{n_default} CT DICOM file(s) have no window of their own: Hounsfield units "
                f"{CT_HU_RANGE[0]:g}..{CT_HU_RANGE[1]:g} were mapped onto 0..255 (recorded in "
                "the card); pass --window CENTER,WIDTH to choose another"), stacklevel=2)
        files = {}
        for size in sizes:
            fname = _npz_name(name, size)
            tmp = root / f".{fname}.tmp-{os.getpid()}"
            _write_npz(tmp, {**{f"{s}_images": (work.arrays[(size, s)], keep[s]) for s in SPLITS},
                             **{f"{s}_labels": (labels[s], keep[s]) for s in SPLITS}})
            files[size] = (tmp, root / fname)
        for tmp, final in files.values():
            os.replace(tmp, final)
        content = hashlib.sha256(b"".join(work.digests[s][keep[s]].tobytes()
                                          for s in SPLITS)).hexdigest()
        card = {
            "format": CARD_FORMAT,
            "name": name,
            "task": task_type.value,
            "label_names": found.label_names,
            "n_channels": n_channels,
            "n_samples": counts,
            "counts": split_counts(found),
            "splits": splits_made,
            "sizes": {str(s): {"file": final.name, "md5": file_digest(final, "md5")}
                      for s, (_, final) in files.items()},
            "resize": "centre-crop to a square, then PIL bicubic to SIZE x SIZE (kept as is at "
                      "its own size)",
            "intensity": {**RULES, **({"dicom_window": window, "dicom_no_window": DICOM_DEFAULT,
                                       "files_with_default_window": n_default}
                                      if "dicom" in options else {})},
            "source": {"path": str(src), "labels_csv": str(labels_csv) if labels_csv else None,
                       "files": counts["train"] + counts["val"] + counts["test"],
                       "sha256": content},
            "skipped": skipped + [{k: v for k, v in b.items() if k in ("path", "reason")}
                                  for b in work.state["bad"]],
            "plan": plan,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "license": "",
        }
        write_atomic(card_file, json.dumps(card, indent=1))
        shutil.rmtree(work.folder, ignore_errors=True)
        register_card(card_file)
        status = "resumed" if work.resumed else "imported"
        return ImportResult(name, card_file, status, counts, card["skipped"],
                            decoded / wall if wall > 0 else 0.0)


def _npz_name(name: str, size: int) -> str:
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def _remove_stale_temps(root: Path, name: str) -> None:
    """Delete the `.NAME[_SIZE].npz.tmp-PID` files an import of NAME killed during its final
    write left behind (call it holding NAME's import lock)."""
    for size in SIZES:
        for stale in root.glob(f".{_npz_name(name, size)}.tmp-*"):
            stale.unlink(missing_ok=True)


def _write_npz(path: Path, members: dict) -> None:
    """An uncompressed npz whose members are `array[rows]`, streamed in blocks (never a whole
    array in memory), with fixed timestamps (deterministic bytes); fsynced."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, (array, rows) in members.items():
            shape = (len(rows),) + tuple(array.shape[1:])
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, {
                    "descr": np.lib.format.dtype_to_descr(array.dtype),
                    "fortran_order": False, "shape": shape})
                step = max(1, (64 << 20) // max(1, int(np.prod(shape[1:])) * array.itemsize))
                for lo in range(0, len(rows), step):
                    out.write(np.ascontiguousarray(array[rows[lo:lo + step]]).tobytes())
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
