"""The `medfm` command line: argument parsing only; every verb calls a plain API function.

    medfm extract --dataset breastmnist --backbone tf_efficientnet_lite0.in1k --size 28
    medfm stores

User errors (MedfmError) print one line and exit with code 2; Ctrl-C exits 130 and keeps every
finished chunk, so rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from medfm.errors import InvalidArgumentError, MedfmError

EXIT_USER_ERROR = 2  # bad input, missing file, corrupt store...
EXIT_INTERRUPTED = 130  # Ctrl-C


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in _csv(text)]
    except ValueError:
        raise InvalidArgumentError(f"--size {text!r} must be comma-separated integers, "
                                   f"e.g. 28,224.") from None


def _print_table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


# --- extract / stores -------------------------------------------------------------------------

def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="embed MedMNIST splits into HDF5 feature stores")
    p.add_argument("--dataset", required=True, help="flag(s), comma-separated, e.g. breastmnist")
    p.add_argument("--backbone", required=True, help="timm name(s)[.tag] or medfm alias(es)")
    p.add_argument("--size", required=True, help="source size(s): 28,64,128,224")
    p.add_argument("--resize-policy", choices=["bilinear", "bicubic", "nearest", "pad", "native"],
                   help="how images reach the input size (default: bilinear)")
    p.add_argument("--input-size", type=int, help="model input side (default: the backbone's)")
    p.add_argument("--batch-size", type=int, help="images per forward (default: 256 GPU, 32 CPU)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--weights", help="local .safetensors/.pth checkpoint, or 'random'")
    p.add_argument("--workdir", help="default: $MEDFM_WORKDIR or ./medfm-work")
    p.add_argument("--data-root", help="default: $MEDFM_DATA_ROOT or ~/.medmnist")
    p.add_argument("--force", action="store_true", help="recompute finished stores")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_extract)


def _run_extract(args) -> int:
    from medfm.extract import extract

    for dataset in _csv(args.dataset):
        for size in _sizes(args.size):
            for backbone in _csv(args.backbone):
                result = extract(dataset=dataset, backbone=backbone, size=size,
                                 resize_policy=args.resize_policy, input_size=args.input_size,
                                 batch_size=args.batch_size, device=args.device,
                                 dtype=args.dtype, weights=args.weights, workdir=args.workdir,
                                 data_root=args.data_root, force=args.force,
                                 progress=not args.quiet)
                s = result.summary
                rate = f", {result.images_per_s:.0f} img/s" if result.images_per_s else ""
                verb = {"exists": "already extracted, nothing to do",
                        "built": "built", "resumed": "resumed and finished"}[result.status]
                print(f"{s['dataset']}@{s['size']} {s['backbone']} ({s['policy']}): {verb} -> "
                      f"{result.path} [{s['rows']} rows x {s['dims']} dims{rate}]")
    return 0


def _add_stores(sub) -> None:
    p = sub.add_parser("stores", help="list feature stores (complete, partial, corrupt)")
    p.add_argument("--workdir", help="default: $MEDFM_WORKDIR or ./medfm-work")
    p.set_defaults(run=_run_stores)


def _run_stores(args) -> int:
    from medfm.store.features import list_stores

    rows = list_stores(args.workdir)
    _print_table(rows, ["dataset", "size", "backbone", "policy", "dtype", "dims", "rows",
                        "bytes", "status"])
    return 0


# --- results ----------------------------------------------------------------------------------

RESULT_COLUMNS = ["dataset", "size", "backbone", "method", "backend", "fraction", "shots", "seed",
                  "n_train", "acc", "auc", "balanced_acc"]  # what `medfm results` shows


def _add_filters(p) -> None:
    """Registry filters shared by `results` and `report`."""
    p.add_argument("--dataset", help="flag(s), comma-separated")
    p.add_argument("--backbone", help="timm architecture(s), comma-separated")
    p.add_argument("--size", help="source size(s), comma-separated")
    p.add_argument("--method", help="logreg, knn and/or finetune, comma-separated")
    p.add_argument("--workdir", help="default: $MEDFM_WORKDIR or ./medfm-work")


def _filters(args) -> dict:
    filters = {}
    for name in ("dataset", "backbone", "method"):
        if getattr(args, name):
            filters[name] = _csv(getattr(args, name))
    if args.size:
        filters["size"] = _sizes(args.size)
    return filters


def _add_results(sub) -> None:
    p = sub.add_parser("results", help="query the results registry")
    _add_filters(p)
    p.add_argument("--format", choices=["table", "csv", "json", "md"], default="table")
    p.set_defaults(run=_run_results)


def results_frame(workdir=None, **filters):
    """The registry as a pandas DataFrame (the API behind `medfm results`)."""
    from medfm.store.registry import Registry

    return Registry.in_workdir(workdir).to_dataframe(**filters)


def _run_results(args) -> int:
    frame = results_frame(args.workdir, **_filters(args))
    if args.format == "json":
        print(frame.to_json(orient="records", indent=1))
        return 0
    if args.format == "csv":
        print(frame.to_csv(index=False), end="")
        return 0
    shown = frame[RESULT_COLUMNS].copy()
    for col in ("acc", "auc", "balanced_acc"):
        shown[col] = (100 * shown[col]).round(2)
    shown = shown.astype(object).where(shown.notna(), "")
    if args.format == "md":
        print("| " + " | ".join(RESULT_COLUMNS) + " |")
        print("|" + "---|" * len(RESULT_COLUMNS))
        for row in shown.itertuples(index=False):
            print("| " + " | ".join(str(v) for v in row) + " |")
        return 0
    _print_table(shown.to_dict("records"), RESULT_COLUMNS)
    return 0


# --- entry point ------------------------------------------------------------------------------

VERBS: list[Callable] = [_add_extract, _add_stores, _add_results]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medfm", description="Benchmark pretrained backbones on MedMNIST: extract features, "
        "probe them, fine-tune, report.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MedfmError as exc:
        print(f"medfm {args.verb}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"medfm {args.verb}: interrupted; finished work is kept, rerun the same command "
              f"to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
