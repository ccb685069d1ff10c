"""The `medfm` command line: argument parsing only; every verb calls a plain API function.

    medfm extract --dataset breastmnist --backbone tf_efficientnet_lite0.in1k --size 28
    medfm stores

User errors (MedfmError, argparse's usage errors, an option given as "") print one line and
exit with code 2, as does a full, read-only or forbidden disk (STORAGE_ERRNOS); any other
exception is a bug and keeps its traceback. Ctrl-C exits 130 and keeps every finished chunk, so
rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from collections.abc import Callable

from medfm.cli_table import csv_items as _csv
from medfm.cli_table import print_table as _print_table
from medfm.cli_table import sizes as _sizes
from medfm.errors import InvalidArgumentError, MedfmError, MedfmWarning
from medfm.preprocess import NORMALIZATIONS, RESIZE_POLICIES
from medfm.resolve.defaults import PROBE_METHOD, SOLVERS

EXIT_USER_ERROR = 2  # bad input, missing file, corrupt store...
EXIT_INTERRUPTED = 130  # Ctrl-C
STORAGE_ERRNOS = {  # OSErrors the CLI reports on one line (exit 2) instead of a traceback
    errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large",
    errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


# --- extract / stores -------------------------------------------------------------------------

def _add_datasets(p, help_text: str) -> None:
    """--dataset (also spelled --datasets): flags, comma-separated."""
    p.add_argument("--dataset", "--datasets", dest="dataset", help=help_text)


def _add_preprocess(p) -> None:
    """The preprocessing request, shared by extract and finetune (medfm.preprocess)."""
    p.add_argument("--resize-policy", choices=RESIZE_POLICIES,
                   help="how images reach the input size (default: bilinear)")
    p.add_argument("--input-size", type=int, help="model input side (default: the backbone's)")
    p.add_argument("--normalize", choices=NORMALIZATIONS,
                   help="backbone: its mean/std (default); half: mean = std = 0.5")


def _add_preset(p, what: str) -> None:
    """--preset NAME: run as that published preset's grid does (medfm.resolve.presets)."""
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.resolve.presets import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"{what} exactly as `medfm grid --preset NAME` does (docs/presets.md)")


def _add_sampler(p) -> None:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.sampling import SAMPLERS

    p.add_argument("--sampler", choices=SAMPLERS,
                   help="how subsets are drawn: shuffled (seeded, stratified; default) or "
                        "first-per-class (the seed paper's first n images of each class)")


def _datasets(args, sizes: list[int]):
    """Resolved datasets of --dataset (default: every MedMNIST dataset, skipping missing files
    with one line each on stderr)."""
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.data import resolve_datasets

    refs, skipped = resolve_datasets(_csv(args.dataset, "--dataset"), sizes, args.data_root)
    for line in skipped:
        print(f"medfm {args.verb}: {line}", file=sys.stderr)
    return refs


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="embed MedMNIST splits into HDF5 feature stores")
    _add_datasets(p, "flag(s), comma-separated (default: every MedMNIST dataset whose file "
                     "is present or can be downloaded)")
    p.add_argument("--backbone", required=True, help="timm name(s)[.tag] or medfm alias(es)")
    p.add_argument("--size", required=True, help="source size(s): 28,64,128,224")
    _add_preprocess(p)
    p.add_argument("--batch-size", type=int, help="images per forward (default: 256 GPU, 32 CPU)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["float16", "float32"],
                   help="feature dtype (default float16; a preset's own)")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="arithmetic of the forward pass (default auto: bfloat16 autocast on "
                        "CUDA, float32 elsewhere); part of the store's identity")
    _add_preset(p, "prepare images (per backbone) and store features")
    p.add_argument("--weights", help="local .safetensors/.pth checkpoint, or 'random'")
    p.add_argument("--workdir", help="default: $MEDFM_WORKDIR or ./medfm-work")
    p.add_argument("--data-root", help="default: $MEDFM_DATA_ROOT or ~/.medmnist")
    p.add_argument("--force", action="store_true", help="recompute finished stores")
    p.add_argument("--compile", action="store_true",
                   help="run the backbone torch.compile-d (recorded with the store, not part "
                        "of its identity; pays on GPUs for large sets, costs a warm-up)")
    p.add_argument("--corruptions", help="also embed corrupted test splits: medmnist-c (every "
                   "MedMNIST-C corruption of the dataset) or some of them, comma-separated")
    p.add_argument("--severities", default="1..5", help="MedMNIST-C severities (default 1..5)")
    p.add_argument("--corruption-seed", type=int, default=0,
                   help="seed of the corrupted images (default 0)")
    p.add_argument("--corruption-base", help="an imported dataset: the MedMNIST dataset whose "
                   "corruption set to use")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_extract)


def _run_extract(args) -> int:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.extract import extract_request
    from medfm.preprocess import PreprocessRequest
    from medfm.resolve.store import resolve_store_request

    preprocess = PreprocessRequest(args.resize_policy, args.input_size, args.normalize)
    dtype = args.dtype or "float16"
    if args.preset is not None:
        # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
        from medfm.backbones.names import resolve_backbone
        from medfm.resolve.presets import get_preset

        preset = get_preset(args.preset)
        if preprocess != PreprocessRequest() or args.dtype not in (None, preset.dtype):
            raise InvalidArgumentError(
                f"preset {preset.name} prepares images its own way per backbone and stores "
                f"{preset.dtype}; drop --resize-policy, --input-size, --normalize and --dtype.")
        backbones = [resolve_backbone(b, args.weights) for b in _csv(args.backbone, "--backbone")]
        requests = [resolve_store_request(dataset=ref, backbone=b, preprocess=preset.preprocess(b),
                                          dtype=preset.dtype, device=args.device,
                                          precision=preset.extract_precision(args.precision))
                    for ref in _datasets(args, _sizes(args.size)) for b in backbones]
    else:
        requests = [resolve_store_request(dataset=ref, backbone=backbone, weights=args.weights,
                                          preprocess=preprocess, dtype=dtype,
                                          precision=args.precision, device=args.device)
                    for ref in _datasets(args, _sizes(args.size))
                    for backbone in _csv(args.backbone, "--backbone")]
    if args.corruptions:  # every corruption and severity checked before any store is built
        # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
        from medfm.robust.corrupt import parse_severities, resolve_corruptions
        from medfm.limits import check_seed

        check_seed(args.corruption_seed, "--corruption-seed")
        for request in requests:
            resolve_corruptions(request.dataset.name, args.corruptions,
                                parse_severities(args.severities), args.corruption_base)
    for request in requests:
        result = extract_request(request, batch_size=args.batch_size, device=args.device,
                                 workdir=args.workdir, force=args.force,
                                 progress=not args.quiet, compile=args.compile)
        s = result.summary
        rate = f", {result.images_per_s:.0f} img/s" if result.images_per_s else ""
        verb = {"exists": "already extracted, nothing to do",
                "built": "built", "resumed": "resumed and finished"}[result.status]
        print(f"{s['dataset']}@{s['size']} {s['backbone']} ({s['policy']}): {verb} -> "
              f"{result.path} [{s['rows']} rows x {s['dims']} dims{rate}]")
        if args.corruptions:
            _extract_corrupted(request, args)
    return 0


def _extract_corrupted(request, args) -> None:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.robust.corrupt import parse_severities
    from medfm.extract.extractor import extract_corrupted

    result = extract_corrupted(
        request, corruptions=args.corruptions, severities=parse_severities(args.severities),
        seed=args.corruption_seed, base=args.corruption_base, batch_size=args.batch_size,
        device=args.device, workdir=args.workdir, force=args.force, progress=not args.quiet)
    verb = {"exists": "already extracted, nothing to do", "built": "built",
            "resumed": "resumed and finished"}[result.status]
    names = sorted({c for c, _ in result.pairs})
    print(f"  corrupted test splits ({len(names)} corruptions x "
          f"{len(result.pairs) // max(1, len(names))} severities): {verb} -> {result.path}")
    for skipped in result.skipped:
        print(f"  skipped {skipped['corruption']}: {skipped['reason']}")


def _add_stores(sub) -> None:
    p = sub.add_parser("stores", help="list feature stores (complete, partial, corrupt); a "
                       "store changed since it was last checked is checked against its "
                       "fingerprint")
    p.add_argument("--workdir", help="default: $MEDFM_WORKDIR or ./medfm-work")
    check = p.add_mutually_exclusive_group()
    check.add_argument("--no-verify", action="store_true",
                       help="do not read stores to check them (unchecked ones show as "
                            "unverified)")
    check.add_argument("--verify", action="store_true",
                       help="read and check every store (fingerprint and block checksums), "
                            "also those recorded as verified")
    p.set_defaults(run=_run_stores)


def _run_stores(args) -> int:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.store.features import list_stores

    rows = list_stores(args.workdir, verify=not args.no_verify, recheck=args.verify)
    _print_table(rows, ["dataset", "size", "backbone", "policy", "dtype", "dims", "rows",
                        "bytes", "status"])
    return 0


# --- probe ----------------------------------------------------------------------------------

def _add_probe(sub) -> None:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.episodes_cli import add_probe_flags as add_episode_flags
    from medfm.probe.methods import probe_methods

    methods = probe_methods()
    p = sub.add_parser("probe", help="fit probes on feature stores over fractions x seeds")
    _add_datasets(p, "flag(s), comma-separated (default: every store)")
    p.add_argument("--backbone", help="backbone(s) as extracted, any spelling, comma-separated")
    p.add_argument("--size", help="source size(s), comma-separated")
    p.add_argument("--store", help="path of one store (instead of the filters)")
    p.add_argument("--fractions", help="training fractions, e.g. 0.01,0.1,1.0 (default 1.0)")
    p.add_argument("--shots", help="images per class, e.g. 1,5,10")
    p.add_argument("--seeds", help="e.g. 0,1,2 or 0-4 (default 0,1,2; a preset's own)")
    p.add_argument("--method", choices=sorted(methods), default=PROBE_METHOD)
    add_episode_flags(p)
    _add_sampler(p)
    _add_preset(p, "probe (method options, sampler, seeds, subsets; its stores only)")
    for option in {o.name: o for m in methods.values() for o in m.options}.values():
        p.add_argument(option.flag, dest=option.name, choices=option.choices or None,
                       help=option.help)
    p.add_argument("--selection", choices=sorted({s for m in methods.values()
                                                  for s in m.selections}),
                   help="how hyper-parameters are chosen (logreg: val (default) or holdout)")
    p.add_argument("--solver", "--backend", dest="solver", choices=SOLVERS, default="auto",
                   help="how logreg is fitted (not part of a run's identity; default auto: "
                        "sklearn for small problems, torch for large ones; cuml/torch on a GPU)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--workdir", help="default: $MEDFM_WORKDIR or ./medfm-work")
    p.add_argument("--force", action="store_true", help="refit runs already in the registry")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_probe)


def _run_probe(args) -> int:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.episodes_cli import print_summary, probe_kwargs
    from medfm.probe import get_method, probe
    from medfm.sampling import parse_fractions, parse_seeds, parse_shots
    from medfm.store.registry import Registry

    fractions = parse_fractions(args.fractions) if args.fractions is not None else None
    shots = parse_shots(args.shots) if args.shots is not None else None
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    options = {o.name: getattr(args, o.name) for o in get_method(args.method).options
               if getattr(args, o.name) is not None}
    if args.store is not None and not args.store.strip():
        raise InvalidArgumentError("--store '' names no file; give a store's path, or leave "
                                   "it out to probe every matching store.")
    targets = [dict(store=args.store)] if args.store else [
        dict(dataset=d, backbone=b, size=s)
        for d in _csv(args.dataset, "--dataset") or [None]
        for b in _csv(args.backbone, "--backbone") or [None]
        for s in _sizes(args.size) or [None]]
    digests, computed, skipped, wall = [], 0, 0, 0.0  # computed: rows this process inserted
    filled = 0  # corrupted-split evaluations added to runs recorded before
    for target in targets:
        report = probe(**target, fractions=fractions, shots=shots, seeds=seeds,
                       method=args.method, selection=args.selection, solver=args.solver,
                       device=args.device, workdir=args.workdir, force=args.force,
                       progress=not args.quiet, sampler=args.sampler, preset=args.preset,
                       **probe_kwargs(args), **options)
        digests += [r.key.digest() for r in report.computed] + [k.digest() for k in report.skipped]
        computed += len(report.computed)
        skipped += len(report.skipped)
        filled += report.corrupted_filled
        wall += report.wall_s
    frame = Registry.in_workdir(args.workdir).to_dataframe(digest=digests)
    if not print_summary(frame):  # episodes: their mean and interval, not one row each
        _print_results(frame, "table")
    print(f"{computed} run(s) fitted, {skipped} already in the registry "
          f"({'nothing needed recomputing, ' if not computed else ''}{wall:.1f} s)")
    if filled:
        print(f"{filled} corrupted-split evaluation(s) added to recorded runs (no refit where "
              "the fitted probe was kept)")
    return 0


# --- finetune ---------------------------------------------------------------------------------

def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="train backbones end to end (batch of jobs)")
    _add_datasets(p, "flag(s), comma-separated (default: every MedMNIST dataset whose file "
                     "is present or can be downloaded)")
    p.add_argument("--backbone", required=True, help="timm name(s)[.tag] or alias(es)")
    p.add_argument("--size", required=True, help="source size(s): 28,64,128,224")
    p.add_argument("--fractions", help="training fractions, e.g. 0.1,1.0 (default 1.0)")
    p.add_argument("--shots", help="images per class, e.g. 1,5,10")
    p.add_argument("--seeds", help="e.g. 0,1,2 or 0-4 (default 0; a preset's own)")
    p.add_argument("--recipe",
                   help="medfm, medfm-v1 (medfm before its step budget), seed-paper, "
                        "medmnist-plus or medmnist-v2 (default medfm; a preset's own)")
    _add_sampler(p)
    _add_preset(p, "fine-tune each backbone (recipe and its per-backbone rules, preprocessing, "
                   "sampler, seeds, subsets)")
    p.add_argument("--epochs", help="override the recipe's length in epochs")
    p.add_argument("--batch-size", help="override the recipe's batch size")
    _add_preprocess(p)
    p.add_argument("--freeze-backbone", action="store_true",
                   help="train only the head through the frozen backbone (the references' "
                        "'linear probing'; with --preset, BatchNorm in train mode as theirs)")
    lora = p.add_argument_group(
        "LoRA", "train low-rank adapters (peft) and the head; every pretrained weight and "
                "BatchNorm statistic stays frozen. Any --lora-* option implies --lora")
    lora.add_argument("--lora", action="store_true",
                      help="adapt the backbone with LoRA instead of fine-tuning all of it")
    lora.add_argument("--lora-rank", help="adapters' rank (default 8)")
    lora.add_argument("--lora-alpha", help="update scale numerator: alpha / rank (default 16)")
    lora.add_argument("--lora-dropout", help="dropout on the adapters' input (default 0.1)")
    lora.add_argument("--lora-targets",
                      help="'auto' (attention qkv/proj of transformers; dense Conv2d and Linear "
                           "layers of CNNs) or module names, e.g. qkv,proj (default auto)")
    lora.add_argument("--lora-lr", help="adapters' peak learning rate (default 1e-3)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any recipe field, e.g. --set lr_head=1e-3 (repeatable)")
    p.add_argument("--weights", help="local checkpoint, or 'random'")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--workdir", help="default: $MEDFM_WORKDIR or ./medfm-work")
    p.add_argument("--data-root", help="default: $MEDFM_DATA_ROOT or ~/.medmnist")
    p.add_argument("--force", action="store_true", help="retrain runs already in the registry")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only: on CUDA the same bits every run and resume")
    p.add_argument("--compile", action="store_true",
                   help="train the model torch.compile-d (recorded with the row, not part of "
                        "its key; costs a warm-up)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_finetune)


def _overrides(args) -> dict:
    overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise InvalidArgumentError(f"--set {item!r} must look like FIELD=VALUE.")
        overrides[field.strip().replace("-", "_")] = value.strip()
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.resolve.recipes import LORA_FIELDS

    for name in ("epochs", "batch_size", *LORA_FIELDS):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.freeze_backbone:
        overrides["freeze_backbone"] = "true"
    return overrides


def _run_finetune(args) -> int:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.finetune import finetune
    from medfm.resolve.recipes import LORA_FIELDS
    from medfm.sampling import parse_fractions, parse_seeds, parse_shots
    from medfm.store.registry import Registry

    report = finetune(
        datasets=_csv(args.dataset, "--dataset"), backbones=_csv(args.backbone, "--backbone"),
        sizes=_sizes(args.size),
        fractions=parse_fractions(args.fractions) if args.fractions is not None else None,
        shots=parse_shots(args.shots) if args.shots is not None else None,
        seeds=parse_seeds(args.seeds) if args.seeds is not None else None,
        recipe=args.recipe, overrides=_overrides(args), resize_policy=args.resize_policy,
        input_size=args.input_size, normalize=args.normalize, weights=args.weights,
        lora=args.lora or any(getattr(args, o) is not None for o in LORA_FIELDS),
        device=args.device, workdir=args.workdir, data_root=args.data_root, force=args.force,
        progress=not args.quiet, deterministic=args.deterministic, sampler=args.sampler,
        preset=args.preset, compile=args.compile)
    for line in report.missing:
        print(f"medfm finetune: {line}", file=sys.stderr)
    if report.ran:
        frame = Registry.in_workdir(args.workdir).to_dataframe(
            digest=[row.key.digest() for row in report.ran])
        _print_results(frame, "table")
    print(f"{len(report.ran)} run(s) trained, {len(report.skipped)} already in the registry")
    return 0


# --- results ----------------------------------------------------------------------------------

RESULT_COLUMNS = ["dataset", "size", "backbone", "weights", "method", "fraction", "shots", "seed",
                  "n_train", "acc", "auc", "balanced_acc", "ece"]  # what `medfm results` shows
PERCENT_COLUMNS = ("acc", "auc", "balanced_acc", "ece")  # shown in % in table and md


def _add_filters(p) -> None:
    """Registry filters shared by `results` and `report`."""
    _add_datasets(p, "flag(s), comma-separated")
    p.add_argument("--backbone", help="backbone(s) in any spelling (alias, arch, arch.tag)")
    p.add_argument("--size", help="source size(s), comma-separated")
    p.add_argument("--method", help="logreg, knn and/or finetune, comma-separated")
    p.add_argument("--workdir", help="default: $MEDFM_WORKDIR or ./medfm-work")


def _filters(args) -> dict:
    """Registry filters of `results` and `report`; a dataset, size or method that cannot exist
    is an error (not an empty table)."""
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.data import get_dataset
    from medfm.resolve.recipes import METHODS as FINETUNE_METHODS
    from medfm.probe.methods import probe_methods

    filters = {}
    if args.dataset is not None:
        filters["dataset"] = [get_dataset(d).flag for d in _csv(args.dataset, "--dataset")]
    if args.backbone is not None:
        filters["backbone"] = _csv(args.backbone, "--backbone")
    if args.method is not None:
        known = (*probe_methods(), *FINETUNE_METHODS)
        filters["method"] = _csv(args.method, "--method")
        for method in filters["method"]:
            if method not in known:
                raise InvalidArgumentError(f"--method {method!r} is not one of "
                                           f"{', '.join(known)}.")
    if args.size is not None:
        filters["size"] = _sizes(args.size)
    return filters


def _add_results(sub) -> None:
    p = sub.add_parser("results", help="query the results registry")
    _add_filters(p)
    p.add_argument("--format", choices=["table", "csv", "json", "md"], default="table")
    p.add_argument("--corruptions", action="store_true",
                   help="also one row per corrupted-split evaluation, with its corruption and "
                   "severity (clean rows: empty, null in json)")
    p.set_defaults(run=_run_results)


def _run_results(args) -> int:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.store.registry import Registry

    registry = Registry.existing(args.workdir)
    frame = registry.to_dataframe(corruptions=args.corruptions, **_filters(args))
    _print_results(frame, args.format)
    if args.format == "table" and not args.corruptions:
        # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
        from medfm.episodes_cli import print_summary

        print_summary(frame)  # few-shot episodes: their mean and 95% interval, when any
    return 0


def _print_results(frame, fmt: str) -> None:
    """Registry rows as a table, Markdown, CSV or JSON (ACC/AUC/ECE in % except in csv/json);
    corruption and severity columns where the rows include corrupted evaluations."""
    if fmt == "json":
        print(frame.to_json(orient="records", indent=1))
        return
    if fmt == "csv":
        print(frame.to_csv(index=False), end="")
        return
    columns = list(RESULT_COLUMNS)
    if frame["corruption"].notna().any():
        columns[columns.index("n_train"):columns.index("n_train")] = ["corruption", "severity"]
    shown = frame[columns].copy()
    for col in PERCENT_COLUMNS:
        shown[col] = (100 * shown[col]).round(2)
    shown = shown.astype(object).where(shown.notna(), "")
    if fmt == "md":
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in shown.itertuples(index=False):
            print("| " + " | ".join(str(v) for v in row) + " |")
        return
    _print_table(shown.to_dict("records"), columns)


# --- leaderboard / export / merge ---------------------------------------------------------------

def _add_leaderboard(sub) -> None:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.report.leaderboard import ALPHA, FORMATS, LEADERBOARD_METRICS, POSTHOCS

    p = sub.add_parser("leaderboard", help="backbones ranked across datasets: mean rank, "
                       "Friedman test, post-hoc test, critical-difference diagrams")
    _add_filters(p)
    p.add_argument("--metric", choices=LEADERBOARD_METRICS, default="auc",
                   help="metric that ranks the variants (default auc)")
    p.add_argument("--posthoc", choices=POSTHOCS, default="nemenyi",
                   help="post-hoc test after Friedman (default nemenyi)")
    p.add_argument("--alpha", type=float, default=ALPHA,
                   help=f"significance level of the post-hoc test (default {ALPHA})")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--out", help="folder of the CD diagrams (default: <workdir>/leaderboard)")
    p.add_argument("--no-diagrams", action="store_true",
                   help="draw no CD diagram (faster; the statistics are the same)")
    p.set_defaults(run=_run_leaderboard)


def _run_leaderboard(args) -> int:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.report.leaderboard import leaderboard

    board = leaderboard(workdir=args.workdir, out=args.out, metric=args.metric,
                        posthoc=args.posthoc, alpha=args.alpha,
                        diagrams=not args.no_diagrams, **_filters(args))
    print(board.render(args.format), end="" if args.format == "csv" else "\n")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write registry rows, scores and provenance to a bundle")
    p.add_argument("bundle", help="the bundle file to write (e.g. lab-a.medfm)")
    _add_filters(p)
    p.add_argument("--force", action="store_true", help="replace an existing bundle file")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.store.bundle import export_bundle

    done = export_bundle(args.bundle, workdir=args.workdir, force=args.force, **_filters(args))
    counts = done.counts
    print(f"bundle {done.bundle_id} -> {done.path}: {counts['results']} row(s), "
          f"{counts['scores']} with per-sample scores, {counts['evaluations']} corrupted "
          f"evaluation(s), {counts['stores']} store provenance record(s)")
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="add a bundle's rows to this work directory's registry")
    p.add_argument("bundle", help="a bundle written by `medfm export`")
    p.add_argument("--dry-run", action="store_true",
                   help="check the bundle and say what a merge would do; write nothing")
    p.add_argument("--workdir", help="default: $MEDFM_WORKDIR or ./medfm-work")
    p.set_defaults(run=_run_merge)


def _run_merge(args) -> int:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.store.bundle import merge_bundle

    report = merge_bundle(args.bundle, workdir=args.workdir, dry_run=args.dry_run)
    print("\n".join(report.summary()))
    return 0


# --- report / grid ----------------------------------------------------------------------------

def _add_report(sub) -> None:
    p = sub.add_parser("report", help="tables, plots, guideline and report.html from the registry")
    _add_filters(p)
    p.add_argument("--out", help="output folder (default: <workdir>/report)")
    p.add_argument("--metric", choices=["acc", "auc"], default="auc",
                   help="metric that ranks backbones in the guideline (default auc)")
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.report import report

    files = report(out=args.out, workdir=args.workdir, metric=args.metric, **_filters(args))
    print(f"report of {files.n_runs} run(s) -> {files.html}")
    return 0


def _add_grid(sub) -> None:
    import dataclasses

    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.grid.executors import executors, option_flag

    found = executors()
    p = sub.add_parser("grid", help="run a whole benchmark grid; finished work is skipped")
    p.add_argument("spec", nargs="?", help="YAML grid spec (or use --preset)")
    p.add_argument("--preset", help="seed-paper or medmnist-plus")
    _add_datasets(p, "narrow the grid to these flags, comma-separated")
    p.add_argument("--backbone", "--backbones", dest="backbone",
                   help="narrow the grid to these backbones, comma-separated")
    p.add_argument("--size", "--sizes", dest="size", help="narrow the grid to these sizes")
    p.add_argument("--executor", choices=sorted(found), default="local")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan with counts and its estimated cost, run nothing")
    p.add_argument("--yes", action="store_true",
                   help="run a grid of more jobs than medfm runs unconfirmed (README, Guarantees)")
    p.add_argument("--compile", action="store_true",
                   help="extract and fine-tune torch.compile-d (recorded, not in any key)")
    options = {}
    for cls in found.values():
        for option in dataclasses.fields(cls.Options):
            if "type" in option.metadata:  # options with a command-line form
                options.setdefault(option.name, option)
    for name, option in options.items():  # text here; typed by the chosen executor's Options
        p.add_argument(option_flag(name), dest=f"executor_{name}",
                       default=argparse.SUPPRESS, help=option.metadata["help"])
    p.add_argument("--data-root", help="default: the spec's, else $MEDFM_DATA_ROOT")
    p.add_argument("--workdir", help="default: $MEDFM_WORKDIR or ./medfm-work")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_grid)


def _run_grid(args) -> int:
    import dataclasses

    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.grid import load_spec, preset_spec, run_grid

    if (args.spec is None) == (args.preset is None):
        raise InvalidArgumentError("give either a grid spec file or --preset NAME.")
    spec = load_spec(args.spec) if args.spec else preset_spec(args.preset)
    if args.data_root is not None:
        spec = dataclasses.replace(spec, data_root=str(args.data_root))
    spec = spec.narrowed(datasets=_csv(args.dataset, "--dataset"),
                         backbones=_csv(args.backbone, "--backbone"), sizes=_sizes(args.size))
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.grid.executors import typed_options

    options = typed_options(args.executor, {
        name.removeprefix("executor_"): value for name, value in vars(args).items()
        if name.startswith("executor_")})
    result = run_grid(spec, workdir=args.workdir, executor=args.executor,
                      dry_run=args.dry_run, progress=not args.quiet, yes=args.yes,
                      on_plan=_announce, compile=args.compile, **options)
    print(result.plan.describe() if args.dry_run else result.summary())
    if args.dry_run and result.estimate is not None:
        print("\n".join(result.estimate.describe()))
    return 0 if result.ok else 1


def _announce(plan) -> None:
    """The job count, printed before a grid runs anything."""
    print(f"grid: {len(plan.jobs)} job(s) to run, {sum(plan.done.values())} already done",
          flush=True)


# --- entry point ------------------------------------------------------------------------------

def _add_episodes(sub) -> None:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.episodes_cli import add_episodes

    add_episodes(sub)


def _add_import(sub) -> None:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.imported.cli import add_import

    add_import(sub)


def _add_datasets_verb(sub) -> None:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.imported.cli import add_datasets

    add_datasets(sub)


VERBS: list[Callable] = [_add_import, _add_datasets_verb, _add_extract, _add_stores, _add_probe,
                         _add_finetune, _add_results, _add_report, _add_grid, _add_leaderboard,
                         _add_export, _add_merge, _add_episodes]


class _Version(argparse.Action):
    """`medfm --version`: medfm's version and the libraries' a bundle records, one a line."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
        from medfm.runtime import software_versions

        found = software_versions()
        print(f"medfm {found.pop('medfm')}")
        print("\n".join(f"{name} {version}" for name, version in found.items()))
        parser.exit(0)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (`medfm VERB: error: ...`), exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="medfm", description="Benchmark pretrained backbones on MedMNIST: extract features, "
        "probe them, fine-tune, report.")
    parser.add_argument("--version", action=_Version,
                        help="print medfm's version and its libraries' (as bundles record them)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def _check_not_empty(args) -> None:
    """An option given as "" is an error, never the default it would silently fall back to."""
    for name, value in vars(args).items():
        if isinstance(value, str) and not value.strip():
            flag = "grid spec" if name == "spec" else "--" + name.removeprefix(
                "executor_").replace("_", "-")
            raise InvalidArgumentError(f"{flag} {value!r} is empty; give a value, or leave the "
                                       f"option out for its default.")


def _storage_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (itself or a cause) if it is out of space or quota, a read-only
    file system or a permission refusal: a state of the machine, not a bug."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", MedfmWarning)
            warnings.showwarning = _one_line_warning(args.verb)
            _check_not_empty(args)
            return args.run(args)
    except MedfmError as exc:
        print(f"medfm {args.verb}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"medfm {args.verb}: interrupted; finished work is kept, rerun the same command "
              f"to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # last resort: only a full, read-only or forbidden disk
        cause = _storage_error(exc)
        if cause is None:
            raise  # a bug: keep the traceback
        what = STORAGE_ERRNOS[cause.errno]
        where = f" {cause.filename}" if cause.filename else ""
        fix = ("free space" if cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
               else "make it writable (or pass another --workdir / --out)")
        print(f"medfm {args.verb}: error: {what} writing{where} ({cause.strerror or cause}); "
              f"finished work is kept: {fix}, then rerun the same command to resume.",
              file=sys.stderr)
        return EXIT_USER_ERROR


def _one_line_warning(verb: str):
    """Print medfm's own warnings as `medfm VERB: warning: ...`, others as Python does."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MedfmWarning):
            print(f"medfm {verb}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


if __name__ == "__main__":
    sys.exit(main())
