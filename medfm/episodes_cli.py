"""Command line of few-shot episodes (medfm.episodes): `medfm probe`'s episode flags, the
`medfm episodes export` verb, and the episode summary printed after an episodic probe."""

from __future__ import annotations

from medfm.errors import InvalidArgumentError

SUMMARY_COLUMNS = ("dataset", "size", "backbone", "method", "shots", "seeds", "episodes", "acc",
                   "acc 95% CI", "auc", "auc 95% CI")


def _positive(text: str, flag: str) -> int:
    if not str(text).strip().isdigit() or int(text) < 1:
        raise InvalidArgumentError(f"{flag} {text!r} is not a positive integer.")
    return int(text)


def add_probe_flags(p) -> None:
    """`medfm probe`'s few-shot episode options."""
    p.add_argument("--episodes", help="few-shot episodes per shot count and seed: N draws of "
                                      "--shots images per class (SimpleShot, kNN, logreg)")
    p.add_argument("--ways", help="classes per episode (default: every class); scored on the "
                                  "test images of those classes")
    p.add_argument("--episode-file", help="evaluate on the episodes of this file (written by "
                                          "`medfm episodes export`)")


def probe_kwargs(args) -> dict:
    """probe()'s episode keywords from parsed `medfm probe` arguments."""
    return {"episodes": None if args.episodes is None else _positive(args.episodes,
                                                                     "--episodes"),
            "ways": None if args.ways is None else _positive(args.ways, "--ways"),
            "episode_file": args.episode_file}


def print_summary(frame) -> bool:
    """The mean over episodes with its 95% interval, one line per setting; False when `frame`
    holds no episodic run."""
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.cli_table import print_table as _print_table
    from medfm.episodes import episode_summary

    summary = episode_summary(frame)
    if summary.empty:
        return False
    rows = []
    for r in summary.to_dict("records"):
        row = {k: r[k] for k in SUMMARY_COLUMNS[:7]}
        for metric in ("acc", "auc"):
            row[metric] = f"{100 * r[metric]:.2f}"
            low, high = (100 * r[f"{metric}_{end}"] for end in ("low", "high"))
            row[f"{metric} 95% CI"] = f"{low:.2f}-{high:.2f}"
        rows.append(row)
    print("mean over episodes (95% interval of the mean):")
    _print_table(rows, list(SUMMARY_COLUMNS))
    return True


def add_episodes(sub) -> None:
    """The `medfm episodes export` verb."""
    p = sub.add_parser("episodes", help="write few-shot episodes to a file other labs can load")
    verbs = p.add_subparsers(dest="episodes_verb", required=True, metavar="ACTION")
    e = verbs.add_parser("export", help="draw episodes (seeded) and write them as JSON")
    e.add_argument("--dataset", required=True, help="dataset flag, e.g. breastmnist")
    e.add_argument("--size", default="28", help="source size (its file's MD5 is recorded)")
    e.add_argument("--shots", required=True, help="images per class, e.g. 1,5,10")
    e.add_argument("--episodes", required=True, help="episodes per shot count and seed")
    e.add_argument("--ways", help="classes per episode (default: every class)")
    e.add_argument("--seeds", default="0", help="e.g. 0 or 0-4 (default 0)")
    e.add_argument("--data-root", help="folder of the MedMNIST npz files")
    e.add_argument("--out", required=True, help="the episode file to write (JSON)")
    e.set_defaults(run=_run_export)


def _run_export(args) -> int:
    # a verb's modules load when it runs: `medfm --help` and `medfm results` stay fast
    from medfm.data import get_dataset, load_split, resolve_dataset
    from medfm.episodes import export_episodes
    from medfm.sampling import parse_seeds, parse_shots

    info = get_dataset(args.dataset, args.data_root)
    size = _positive(args.size, "--size")
    ref = resolve_dataset(info.flag, size, args.data_root)
    _, labels = load_split(info.flag, size, "train", args.data_root)
    labels = labels if labels.ndim == 2 and labels.shape[1] > 1 else labels.reshape(-1)
    path = export_episodes(args.out, dataset=ref.name, data_digest=ref.digest, labels=labels,
                           task=info.task, shots=parse_shots(args.shots),
                           seeds=parse_seeds(args.seeds),
                           episodes=_positive(args.episodes, "--episodes"),
                           ways=None if args.ways is None else _positive(args.ways, "--ways"))
    print(f"wrote {path}")
    return 0
