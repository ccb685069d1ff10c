"""What an import reads: the list of images, their labels, fixed splits and groups, from an
ImageFolder tree or a CSV; and the seeded, stratified, group-aware split of the rest.

Layouts:
- `SOURCE/<class>/...` (any depth below the class folder), or `SOURCE/{train,val,test}/<class>/...`
  (`valid`/`validation` also name the val split). Classes are the folder names, sorted.
- `--labels FILE.csv`: a `path` column (relative to SOURCE, or absolute), then either a `label`
  column (class names or ids) or one 0/1 column per label (multi-label), an optional `split`
  column (train/val/test) and an optional `group` column (e.g. patient id). Rows keep the CSV's
  order; folder images are in natural order of their relative paths.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfm.datasources.info import SPLITS
from medfm.imported.images import supported

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
RESERVED_COLUMNS = ("path", "label", "split", "group")
HEAD_BYTES = 132  # enough of a file to see DICOM's magic
# a label column cell that spells a missing value (pandas' default na_values), never a class
MISSING_LABELS = frozenset({"#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                            "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None",
                            "n/a", "nan", "null"})


class SourceError(Exception):
    """Bad input in the source (the message names the file or row and what to do)."""


@dataclass
class Item:
    """One image of the collection."""

    path: Path  # absolute
    rel: str  # as the user named it: relative to SOURCE (or the CSV's value)
    label: tuple[int, ...]  # (class id,) or one 0/1 per label
    split: str | None = None  # fixed split, if the source gives one
    group: str | None = None  # e.g. patient id


@dataclass
class Source:
    """The collection as read from SOURCE: items, class/label names, task, split origin."""

    items: list[Item]
    label_names: list[str]
    multi_label: bool
    split_origin: str  # "folders", "column" or "" (to be split here)
    has_groups: bool
    notes: list[str] = field(default_factory=list)


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def file_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(HEAD_BYTES)
    except OSError:
        return b""


def _image_files(folder: Path) -> list[Path]:
    """Files under `folder` (recursively), hidden files and folders left out."""
    files = [p for p in folder.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(files, key=lambda p: _natural_key(str(p.relative_to(folder))))


def read_folder(root: Path) -> Source:
    """An ImageFolder tree, with or without train/val/test folders on top."""
    if not root.is_dir():
        raise SourceError(f"{root} is not a folder; pass the folder that holds the class "
                          "folders (or train/val/test folders), or a CSV with --labels.")
    tops = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = {p: SPLIT_ALIASES.get(p.name.lower()) for p in tops}
    fixed = bool(tops) and all(split_dirs.values())
    if any(split_dirs.values()) and not fixed:
        odd = [p.name for p, s in split_dirs.items() if not s]
        raise SourceError(f"{root} mixes split folders with other folders ({', '.join(odd)}); "
                          "use either SOURCE/<class>/ or SOURCE/{train,val,test}/<class>/.")
    by_class: dict[str, list[tuple[Path, str | None]]] = defaultdict(list)
    if fixed:
        for folder, split in split_dirs.items():
            for cls in sorted(p for p in folder.iterdir() if p.is_dir()
                              and not p.name.startswith(".")):
                by_class[cls.name] += [(f, split) for f in _image_files(cls)]
            loose = [p.name for p in folder.iterdir() if p.is_file()
                     and not p.name.startswith(".")]
            if loose:
                raise SourceError(f"{folder / loose[0]} is not inside a class folder; put "
                                  f"images in {folder}/<class>/.")
    else:
        for cls in tops:
            by_class[cls.name] += [(f, None) for f in _image_files(cls)]
    if not by_class:
        raise SourceError(f"{root} holds no class folders; expected SOURCE/<class>/<images>.")
    names = sorted(by_class, key=_natural_key)
    items = []
    for idx, name in enumerate(names):
        for path, split in by_class[name]:
            items.append(Item(path, str(path.relative_to(root)), (idx,), split))
    items.sort(key=lambda it: _natural_key(it.rel))
    return Source(items, names, False, "folders" if fixed else "", False)


def read_csv(root: Path, csv_path: Path) -> Source:
    """A labels CSV: path, label or 0/1 label columns, optional split and group."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{csv_path} cannot be read as a UTF-8 CSV ({exc}).") from None
    if not rows:
        raise SourceError(f"{csv_path} has no rows.")
    columns = [c.strip() for c in rows[0]]
    if "path" not in columns:
        raise SourceError(f"{csv_path} has no 'path' column (columns: {', '.join(columns)}).")
    label_columns = [c for c in columns if c not in RESERVED_COLUMNS]
    multi = "label" not in columns
    if multi and not label_columns:
        raise SourceError(f"{csv_path} needs a 'label' column, or one 0/1 column per label.")
    seen: dict[str, int] = {}
    raw_labels = []
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        rel = row["path"]
        if not rel:
            raise SourceError(f"{csv_path} line {line}: empty path.")
        if rel in seen:
            raise SourceError(f"{csv_path} line {line}: {rel} is listed twice (first on line "
                              f"{seen[rel]}); each image once.")
        seen[rel] = line
        if multi:
            try:
                values = tuple(int(row[c]) for c in label_columns)
            except ValueError:
                values = None
            if values is None or any(v not in (0, 1) for v in values):
                raise SourceError(f"{csv_path} line {line}: multi-label columns must hold 0 or "
                                  f"1 (row: {', '.join(row[c] for c in label_columns)}).")
            raw_labels.append(values)
        else:
            if not row["label"]:
                raise SourceError(f"{csv_path} line {line}: {rel} has no label.")
            if row["label"] in MISSING_LABELS:
                raise SourceError(
                    f"{csv_path} line {line}: {rel} has label {row['label']!r}, a missing-value "
                    "marker, not a class; give its label or drop the row.")
            raw_labels.append(row["label"])
    if multi:
        names = label_columns
        labels = raw_labels
    else:
        names = sorted(set(raw_labels), key=_natural_key)
        index = {name: i for i, name in enumerate(names)}
        labels = [(index[v],) for v in raw_labels]
    items = []
    split_given = "split" in columns
    for (rel, line), label, row in zip(seen.items(), labels, rows, strict=True):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        split = None
        if split_given:
            split = SPLIT_ALIASES.get(row["split"].lower())
            if split is None:
                raise SourceError(f"{csv_path} line {line}: split {row['split']!r} is not "
                                  "train, val or test.")
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        items.append(Item(path, rel, label, split, row.get("group") or None))
    if "group" in columns and any(it.group is None for it in items):
        missing = next(it for it in items if it.group is None)
        raise SourceError(f"{csv_path}: {missing.rel} has an empty group; give every row one.")
    return Source(items, names, multi, "column" if split_given else "", "group" in columns)


def check_files(source: Source, skip_bad: bool) -> list[dict]:
    """Every item's file exists and has a supported format; returns the skipped ones (with
    skip_bad) or raises for the first bad one."""
    skipped, kept = [], []
    for item in source.items:
        if not item.path.is_file():
            why = "file not found"
        elif not supported(item.path, file_head(item.path)):
            why = (f"unsupported format {item.path.suffix or '(no suffix)'}: use PNG, JPEG, "
                   "TIFF, BMP or DICOM")
        else:
            kept.append(item)
            continue
        if not skip_bad:
            raise SourceError(f"{item.path}: {why}; fix or remove it, or pass --skip-bad to "
                              "skip such images (they are listed in the dataset card).")
        skipped.append({"path": item.rel, "reason": why})
    source.items = kept
    return skipped


def check_split(fractions: tuple[float, ...]) -> tuple[float, float, float]:
    """--split as three finite positive fractions (train, val, test) summing to 1 (NaN is
    refused: it compares false with everything, so it would pass a plain range check)."""
    if len(fractions) != 3 or not all(math.isfinite(f) and f > 0 for f in fractions) or abs(
            sum(fractions) - 1.0) > 1e-6:
        raise SourceError(f"--split {','.join(map(str, fractions))} must be three positive "
                          "fractions (train,val,test) summing to 1.")
    return fractions


def assign_splits(source: Source, fractions: tuple[float, float, float], seed: int) -> dict:
    """Give every item a split; returns how splits were made (for the card).

    Fixed splits (folders or a column) are kept; with groups, a group found in two fixed
    splits is an error. Otherwise images (or, with groups, whole groups) are split per class
    in the given proportions, seeded; each class needs at least one image (group) per split.
    """
    items = source.items
    if source.split_origin:
        if source.has_groups:
            splits_of = defaultdict(set)
            for it in items:
                splits_of[it.group].add(it.split)
            straddling = {g: s for g, s in splits_of.items() if len(s) > 1}
            if straddling:
                group, splits = next(iter(straddling.items()))
                raise SourceError(
                    f"group {group!r} has images in {' and '.join(sorted(splits))} "
                    f"({len(straddling)} group(s) straddle splits): a patient in two splits "
                    "leaks; fix the split column so each group is in one split.")
        return {"method": source.split_origin, "group_level": source.has_groups}
    units: dict[str, list[Item]] = defaultdict(list)  # group (or the image itself) -> items
    for i, it in enumerate(items):
        units[it.group if source.has_groups else f"#{i}"].append(it)
    strata: dict[object, list[str]] = defaultdict(list)
    for unit, members in units.items():
        if source.multi_label:
            key = "all"  # multi-label: one stratum (label combinations are too many)
        else:
            key = Counter(m.label[0] for m in members).most_common(1)[0][0]
        strata[key].append(unit)
    rng = np.random.default_rng(seed)
    what = "groups" if source.has_groups else "images"
    for key in sorted(strata, key=str):
        units_here = sorted(strata[key], key=_natural_key)
        if len(units_here) < 3:
            name = "the collection" if key == "all" else f"class {source.label_names[key]!r}"
            raise SourceError(f"{name} has {len(units_here)} {what}; at least 3 are needed to "
                              "split it (one per split): add images, merge the class, or give "
                              "fixed splits (folders or a split column).")
        order = rng.permutation(len(units_here))
        n = len(units_here)
        n_val = max(1, int(round(fractions[1] * n)))
        n_test = max(1, int(round(fractions[2] * n)))
        n_val, n_test = min(n_val, n - 2), min(n_test, n - 1 - min(n_val, n - 2))
        for rank, pos in enumerate(order):
            split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            for member in units[units_here[pos]]:
                member.split = split
    return {"method": "stratified" if not source.multi_label else "random",
            "fractions": list(fractions), "seed": seed, "group_level": source.has_groups,
            "unit": "group" if source.has_groups else "image"}


def split_counts(source: Source) -> dict:
    """{split: {label name: images}} (multi-label: positives per label)."""
    counts = {s: dict.fromkeys(source.label_names, 0) for s in SPLITS}
    for it in source.items:
        if source.multi_label:
            for name, value in zip(source.label_names, it.label, strict=True):
                counts[it.split][name] += value
        else:
            counts[it.split][source.label_names[it.label[0]]] += 1
    return counts


def check_classes(source: Source) -> None:
    """Every class must have training images (the probe and the sampler need each class)."""
    if source.multi_label:
        return
    present = {it.label[0] for it in source.items if it.split == "train"}
    missing = [n for i, n in enumerate(source.label_names) if i not in present]
    if missing:
        raise SourceError(f"class {missing[0]!r} has no training image; every class needs "
                          "images in train.")
    if not any(it.split == s for it in source.items for s in ("val",)) or not any(
            it.split == "test" for it in source.items):
        raise SourceError("the collection needs images in each of train, val and test.")
