"""Is the `medfm` fine-tune recipe fair at every data size? Probe vs old vs new recipe (issue 14).

    python benchmarks/finetune_sweep.py                      # the whole sweep (hours on 2 cores)
    python benchmarks/finetune_sweep.py --sets breastmnist:28 --fractions 0.01,0.1 --seeds 0
    python benchmarks/finetune_sweep.py --summary-only       # print the table from the registry
    python benchmarks/finetune_sweep.py --variants medfm,medfm:lr_backbone=3e-4

The pretrained EfficientNet-Lite0 (offline ImageNet weights) on real MedMNIST files, every image
resized (bilinear, the backbone's policy) to `--input-size` for all paradigms: the probe reads a
store extracted with exactly that preprocessing, the fine-tunes train through it. Each paradigm
sees the same training subsets (medfm's one sampler: fraction x seed), picks its model on the
official val split and is tested once on the official test split. Paradigms: the logistic probe
(C by val log-loss), `medfm-v1` (the recipe before issue 14: 30 epochs of batch 64, best val
primary metric, patience 10 epochs) and `medfm` (revision 2: a step budget, val-loss
selection), plus any `--variants` (recipe[:field=value,...], e.g. an lr grid).

Everything goes through medfm's API into one work directory's registry, so an interrupted sweep
resumes where it stopped and a rerun only prints. Runs go fraction by fraction (small first),
so a partial sweep has whole cells. The table: per set and fraction, each paradigm's test ACC,
AUC and balanced accuracy (mean +- std over seeds), how many runs collapsed to one class
(balanced accuracy 0.5 on a binary task: the majority-class predictor), and the median and range
of wall seconds; with more than one `medfm` variant, a column where each seed's variant is the
one with the lowest val loss (the fine-tune tuned on val, as the probe's C is). `--per-run` lists
every run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from medfm.errors import RegistryError
from medfm.extract import extract
from medfm.finetune import finetune
from medfm.probe import probe
from medfm.store.registry import Registry

BACKBONE = "tf_efficientnet_lite0.in1k"  # offline ImageNet weights (efficientnet-lite0 package)
SETS = ("breastmnist:28", "breastmnist:64", "pneumoniamnist:28")  # dataset:source size
FRACTIONS = (0.01, 0.1, 0.3, 1.0)
SEEDS = (0, 1, 2)
VARIANTS = ("medfm-v1", "medfm")


def _variant(text: str) -> tuple[str, str, dict]:
    """"recipe[:field=value,...]" -> (label, recipe, overrides)."""
    recipe, _, rest = text.partition(":")
    overrides = dict(item.split("=", 1) for item in rest.split(",") if item)
    return text, recipe, overrides


def _recipe_matches(row, recipe: str, overrides: dict) -> bool:
    """Whether a fine-tune row ran `recipe` with `overrides` (and no other change)."""
    from medfm.resolve.recipes import resolve_recipe
    from medfm.resolve.keys import canonical_json

    wanted = canonical_json(resolve_recipe(recipe, **overrides).key_params())
    return row.key.method == "finetune" and row.key.params == wanted


def run(args, sets, fractions, seeds, variants) -> None:
    for fraction in fractions:
        for dataset, size in sets:
            common = dict(dataset=dataset, backbone=BACKBONE, size=size,
                          input_size=args.input_size, device=args.device,
                          workdir=args.workdir, progress=False)
            extract(data_root=args.data_root, **common)
            probe(dataset=dataset, backbone=BACKBONE, size=size, fractions=(fraction,),
                  seeds=seeds, device=args.device, workdir=args.workdir, progress=False)
            for seed in seeds:
                for label, recipe, overrides in variants:
                    report = finetune(
                        datasets=[dataset], backbones=[BACKBONE], sizes=[size],
                        fractions=(fraction,), seeds=(seed,), recipe=recipe,
                        overrides=overrides, input_size=args.input_size, device=args.device,
                        workdir=args.workdir, data_root=args.data_root, progress=False)
                    for row in report.ran:
                        print(f"{dataset}_{size} {fraction:g} seed {seed} {label}: ACC "
                              f"{100 * row.acc:.1f} AUC {100 * row.auc:.1f} bal "
                              f"{100 * row.balanced_acc:.1f} steps {row.extra['steps']} "
                              f"batch {row.extra.get('train_batch')} {row.wall_s:.0f} s",
                              flush=True)


def _cell(rows, compact: bool = False) -> str:
    if not rows:
        return "-"
    if compact:  # means only, and how many seeds
        return " / ".join(f"{100 * statistics.mean(getattr(r, m) for r in rows):.1f}"
                          for m in ("acc", "auc", "balanced_acc")) + f" ({len(rows)})"

    def stat(values):
        values = [100 * v for v in values]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f}+-{sd:.1f}"

    collapsed = sum(abs(r.balanced_acc - 0.5) < 1e-9 for r in rows)
    walls = sorted(r.wall_s for r in rows)
    spread = f", {walls[0]:.0f}-{walls[-1]:.0f}" if len(walls) > 1 else ""
    return (f"{stat([r.acc for r in rows])} / {stat([r.auc for r in rows])} / "
            f"{stat([r.balanced_acc for r in rows])} ({len(rows)} runs, {collapsed} collapsed, "
            f"median {statistics.median(walls):.0f} s{spread})")


def _tuned(here, variants) -> list:
    """Per seed, the run of the `medfm` variants (the recipe and its overrides, e.g. an lr grid)
    with the lowest val loss at its kept checkpoint: the fine-tune's hyper-parameters chosen on
    val, as the probe chooses its C on val (one tuning budget for both paradigms). Variants
    that weight the loss (class_weight) are left out: their val loss is not the same quantity."""
    runs = {}
    for _, recipe, overrides in variants:
        if recipe != "medfm" or overrides.get("class_weight", "none") != "none":
            continue
        for row in here:
            if _recipe_matches(row, recipe, overrides) and row.extra.get("best_value") is not None:
                runs.setdefault(row.key.seed, []).append(row)
    return [min(rows, key=lambda r: r.extra["best_value"]) for rows in runs.values()]


def _label(row, variants) -> str:
    return next((label for label, recipe, overrides in variants
                 if _recipe_matches(row, recipe, overrides)), "?")


def import_rows(workdir: str, sources: list[str]) -> None:
    """Copy every run (and its test scores) from the registries of `sources` into `workdir`'s,
    keeping rows already there: shards of a sweep run elsewhere (benchmarks/gpu_sweep.sh) read
    as one table."""
    target = Registry.in_workdir(workdir)
    for source in sources:
        registry, added = Registry.in_workdir(source), 0
        for row in registry.query():
            try:
                y_true, y_score = registry.scores(row.key)
            except RegistryError:  # a row saved without per-sample scores
                y_true = y_score = None
            added += target.add(row, y_score, y_true)
        print(f"{source}: {added} run(s) added to {workdir}")


def _above_chance(row) -> bool:
    """Balanced accuracy's 95% bootstrap interval lies above 50%: the run beats the majority-class
    predictor (and any one-class predictor) beyond the test split's sampling noise."""
    return row.balanced_acc_ci_low > 0.5


def _collapsed(row) -> bool:
    """One class predicted for every test image (binary: balanced accuracy exactly 50%)."""
    return abs(row.balanced_acc - 0.5) < 1e-9


def collapse_check(pairs: list, variants) -> list[str]:
    """Per variant, over (probe run, variant run) pairs on the same subset: how often the
    variant collapses where the probe does not, and where the probe is above chance (its
    balanced accuracy's interval above 50%) how often the variant collapses or is not."""
    lines = ["", "Collapse check, per run against the probe on the same subset (\"above chance\": "
             "balanced accuracy's 95% bootstrap interval above 50%):", "",
             "| variant | pairs | collapsed where the probe did not | probe above chance | "
             "variant collapsed there | variant not above chance there |",
             "|---|---|---|---|---|---|"]
    for label, recipe, overrides in variants:
        mine = [(name, fraction, p, r) for name, fraction, p, r in pairs
                if _recipe_matches(r, recipe, overrides)]
        if not mine:
            continue
        only = [x for x in mine if _collapsed(x[3]) and not _collapsed(x[2])]
        strong = [x for x in mine if _above_chance(x[2])]

        def runs(items):
            return f"{len(items)}" + (" (" + ", ".join(
                f"{name} {fraction:g} s{p.key.seed}" for name, fraction, p, _ in items) + ")"
                if items and len(items) <= 6 else "")
        lines.append(f"| {label} | {len(mine)} | {runs(only)} | {len(strong)} | "
                     f"{runs([x for x in strong if _collapsed(x[3])])} | "
                     f"{runs([x for x in strong if not _above_chance(x[3])])} |")
    return lines


def summary(args, sets, fractions, seeds, variants) -> str:
    registry = Registry.in_workdir(args.workdir)
    tune = sum(recipe == "medfm" and overrides.get("class_weight", "none") == "none"
               for _, recipe, overrides in variants) > 1
    lines = [f"{BACKBONE}, {args.input_size} px input (bilinear); cells: test ACC / AUC / "
             "balanced accuracy, mean+-sd over seeds (runs, runs collapsed to one class, median "
             "and range of wall s)", "",
             "| set | fraction | n_train | probe | " + " | ".join(v[0] for v in variants)
             + (" | medfm, lr chosen on val |" if tune else " |"),
             "|---|---|---|---|" + "---|" * (len(variants) + tune)]
    runs, pairs = [], []
    for dataset, size in sets:
        rows = [r for r in registry.query(dataset=dataset) if r.key.size == size
                and r.key.input_size == args.input_size and r.key.seed in seeds]
        for fraction in fractions:
            here = [r for r in rows if r.key.fraction == fraction]
            probe_rows = [r for r in here if r.key.method == "logreg"
                          and r.key.select_metric == "loss"]
            n_train = sorted({r.n_train for r in here})
            cells = [_cell([r for r in here if _recipe_matches(r, recipe, overrides)],
                           args.compact) for _, recipe, overrides in variants]
            tuned = _tuned(here, variants) if tune else []
            if tune:
                labels = {r.key.seed: _label(r, variants) for r in tuned}
                picked = ", ".join(f"{seed}: {labels[seed].partition(':')[2] or labels[seed]}"
                                   for seed in sorted(labels))
                cells.append(_cell(tuned, args.compact) + (f" [{picked}]" if tuned else ""))
            lines.append(f"| {dataset}-{size} | {fraction:g} | "
                         f"{'/'.join(map(str, n_train)) or '-'} | "
                         f"{_cell(probe_rows, args.compact)} | "
                         + " | ".join(cells) + " |")
            mine = [r for r in here
                    if r.key.method == "finetune" and _label(r, variants) != "?"]
            runs += [(f"{dataset}-{size}", fraction, r) for r in mine]
            by_seed = {r.key.seed: r for r in probe_rows}
            pairs += [(f"{dataset}-{size}", fraction, by_seed[r.key.seed], r) for r in mine
                      if r.key.seed in by_seed]
    lines += collapse_check(pairs, variants)
    if args.per_run:
        lines += ["", "| set | fraction | seed | recipe | steps | batch | kept val value "
                  "(loss; v1: primary) | test ACC / AUC / bal | wall s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, fraction, r in sorted(runs, key=lambda x: (x[0], x[1], x[2].key.seed,
                                                             _label(x[2], variants))):
            best = r.extra.get("best_value")
            lines.append(
                f"| {name} | {fraction:g} | {r.key.seed} | {_label(r, variants)} | "
                f"{r.extra.get('steps')} | {r.extra.get('train_batch')} | "
                f"{'-' if best is None else f'{best:.3f}'} | {100 * r.acc:.1f} / "
                f"{100 * r.auc:.1f} / {100 * r.balanced_acc:.1f} | {r.wall_s:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medfm-sweep"))
    parser.add_argument("--data-root", default=os.environ.get("MEDFM_DATA_ROOT",
                                                              "../shared/data/medmnist"))
    parser.add_argument("--sets", default=",".join(SETS), help="dataset:size,... (real files)")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--variants", default=";".join(VARIANTS),
                        help="recipe[:field=value,...] separated by ';'")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--import-from", nargs="+", default=[], metavar="WORKDIR",
                        help="first copy the runs of these work directories into --workdir")
    parser.add_argument("--compact", action="store_true",
                        help="cells with the means and the number of seeds only")
    parser.add_argument("--per-run", action="store_true",
                        help="also list every fine-tune run (steps, batch, val loss, wall time)")
    args = parser.parse_args()
    sets = [(s.split(":")[0], int(s.split(":")[1])) for s in args.sets.split(",")]
    fractions = tuple(float(f) for f in args.fractions.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    variants = [_variant(v) for v in args.variants.split(";") if v]
    import_rows(args.workdir, args.import_from)
    if not args.summary_only:
        run(args, sets, fractions, seeds, variants)
    print(summary(args, sets, fractions, seeds, variants))


if __name__ == "__main__":
    main()
