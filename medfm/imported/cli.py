"""`medfm import` and `medfm datasets`: the command line of medfm.imported (registered by
medfm.cli)."""

from __future__ import annotations

from medfm.errors import InvalidArgumentError


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InvalidArgumentError(f"{option} {text!r} must be comma-separated numbers.") from None
    return values


def add_import(sub) -> None:
    # the import tool (numpy, Pillow) loads when this parser is built, not with medfm.cli
    from medfm.datasources.info import SIZES
    from medfm.imported import DEFAULT_SIZES, DEFAULT_SPLIT, TASKS

    p = sub.add_parser(
        "import", help="import your own labelled images (folders, CSV, DICOM) as a dataset")
    p.add_argument("name", help="the dataset's name (a-z, 0-9, _ or -), used like a MedMNIST flag")
    p.add_argument("source", help="SOURCE/<class>/..., SOURCE/{train,val,test}/<class>/..., or "
                   "the folder the --labels CSV's paths are relative to")
    p.add_argument("--labels", help="CSV: path, then label (or one 0/1 column per label), "
                   "optional split and group (e.g. patient id)")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                   help=f"sizes to write, from {','.join(map(str, SIZES))} (default "
                   f"{','.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--task", choices=TASKS, default="auto",
                   help="auto: binary / multi-class / multi-label from the labels; ordinal")
    p.add_argument("--split", default=",".join(map(str, DEFAULT_SPLIT)),
                   help="train,val,test fractions when the source has no splits "
                   f"(default {','.join(map(str, DEFAULT_SPLIT))}); by group if a group column")
    p.add_argument("--seed", type=int, default=0, help="seed of that split (default 0)")
    p.add_argument("--channels", type=int, choices=(1, 3),
                   help="force 1 (luminance) or 3 (RGB) channels (default: the images')")
    p.add_argument("--window", metavar="CENTER,WIDTH",
                   help="map every grayscale DICOM's modality values CENTER +- WIDTH/2 onto "
                        "0..255 (default: the file's own window; a CT without one: HU "
                        "-1024..3071; others: the stored bits' range)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable or unsupported images (listed in the card)")
    p.add_argument("--workers", type=int, help="decoding threads (default: cores + 1, max 8)")
    p.add_argument("--data-root", help="where to write (default: $MEDFM_DATA_ROOT or "
                   "~/.medmnist)")
    p.add_argument("--force", action="store_true", help="replace a dataset of that name")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_import)


def run_import(args) -> int:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.cli_table import sizes as _sizes
    from medfm.imported import import_dataset

    result = import_dataset(
        args.name, args.source, labels_csv=args.labels, sizes=tuple(_sizes(args.sizes)),
        task=args.task, split=_floats(args.split, "--split"), seed=args.seed,
        channels=args.channels, skip_bad=args.skip_bad, data_root=args.data_root,
        force=args.force, workers=args.workers, progress=not args.quiet,
        window=_floats(args.window, "--window") if args.window is not None else None)
    counts = "/".join(str(result.counts[s]) for s in ("train", "val", "test"))
    rate = f", {result.images_per_s:.0f} img/s" if result.images_per_s else ""
    verb = {"exists": "already imported, nothing to do"}.get(result.status, result.status)
    skipped = f"; {len(result.skipped)} skipped (listed in the card)" if result.skipped else ""
    print(f"{result.name}: {verb} -> {result.card} [{counts} train/val/test{rate}]{skipped}")
    return 0


def add_datasets(sub) -> None:
    p = sub.add_parser("datasets", help="list MedMNIST datasets and imported ones, with the "
                       "sizes present in the data root")
    p.add_argument("--data-root", help="default: $MEDFM_DATA_ROOT or ~/.medmnist")
    p.set_defaults(run=run_datasets)


def list_datasets(data_root=None) -> list[dict]:
    """One row per dataset the dataset sources have for the data root (the MedMNIST datasets,
    then each imported dataset's card)."""
    # loaded when the verb runs, so building the parser keeps every other verb light
    from medfm.data import get_dataset
    from medfm.datasources import SIZES, listed
    from medfm.paths import resolve_data_root

    root = resolve_data_root(data_root)
    rows = []
    for name in listed(root):
        info = get_dataset(name, root)
        present = [str(s) for s in SIZES if (root / info.filename(s)).exists()]
        rows.append({
            "dataset": info.flag, "source": info.source.title,
            "task": info.task.value, "classes": info.n_classes, "channels": info.n_channels,
            "train/val/test": "/".join(str(info.n_samples[s]) for s in ("train", "val", "test")),
            "sizes present": ",".join(present) or "-",
        })
    return rows


def run_datasets(args) -> int:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.cli_table import print_table as _print_table
    from medfm.paths import resolve_data_root

    rows = list_datasets(args.data_root)
    print(f"data root: {resolve_data_root(args.data_root)}")
    _print_table(rows, ["dataset", "source", "task", "classes", "channels", "train/val/test",
                        "sizes present"])
    return 0
