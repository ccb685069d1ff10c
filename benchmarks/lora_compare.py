"""Where LoRA sits: linear probe vs LoRA vs full fine-tune on identical real BreastMNIST subsets.

    python benchmarks/lora_compare.py [--workdir DIR] [--epochs 10] [--input-size 64]
    python benchmarks/lora_compare.py --dataset pneumoniamnist --fractions 0.01,0.1 --epochs 5

The pretrained EfficientNet-Lite0 (offline ImageNet weights) on BreastMNIST 28, upsampled
(bilinear, the backbone's policy) to `--input-size`, the same preprocessing for all three:
the probe reads a store extracted with it, the fine-tunes train through it. Each paradigm sees
the same training subsets (fractions 0.1 and 1.0, seed 0, from medfm's one sampler) and picks its
model on the official val split; all are tested on the official test split. The fine-tunes use
the `medfm` recipe shortened to `--epochs` epochs in batches of 32 without augmentation; LoRA
adapts the default layers (every dense conv, lora.py) at rank 8, alpha 16, lr 1e-3. Prints one
Markdown row per (fraction, paradigm): test ACC/AUC, trainable parameters and wall time (the
probe's: extraction + fit; the fine-tunes': training + test). Runs already in the work
directory's registry are reused, so rerunning only prints.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from medfm.extract import extract
from medfm.finetune import finetune
from medfm.probe import probe
from medfm.store.registry import Registry

BACKBONE = "tf_efficientnet_lite0.in1k"  # offline ImageNet weights (efficientnet-lite0 package)
FRACTIONS = (0.1, 1.0)
SEED = 0
BATCH_SIZE = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medfm-lora"))
    parser.add_argument("--data-root", default=os.environ.get("MEDFM_DATA_ROOT",
                                                              "../shared/data/medmnist"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--dataset", default="breastmnist",
                        help="a 28 px MedMNIST file in --data-root (default breastmnist)")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                        help="training fractions (default 0.1,1.0)")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dataset, fractions = args.dataset, tuple(float(f) for f in args.fractions.split(","))
    common = dict(dataset=dataset, backbone=BACKBONE, size=28, input_size=args.input_size,
                  device=args.device, workdir=args.workdir, progress=False)

    started = time.perf_counter()
    stored = extract(data_root=args.data_root, **common)
    extract_s = time.perf_counter() - started
    print(f"store: {stored.status} ({extract_s:.0f} s)")
    probe(dataset=dataset, backbone=BACKBONE, size=28, fractions=fractions,
          seeds=(SEED,), device=args.device, workdir=args.workdir, progress=False)
    recipe = {"epochs": args.epochs, "batch_size": BATCH_SIZE, "augment": False}
    for lora in (False, True):
        finetune(datasets=[dataset], backbones=[BACKBONE], sizes=[28], fractions=fractions,
                 seeds=(SEED,), recipe="medfm", overrides=recipe, lora=lora,
                 input_size=args.input_size, device=args.device, workdir=args.workdir,
                 data_root=args.data_root, progress=False)

    registry = Registry.in_workdir(args.workdir)
    rows = [r for r in registry.query(dataset=dataset) if r.key.seed == SEED
            and r.key.input_size == args.input_size and r.key.fraction in fractions]
    print(f"\n{dataset} 28 -> {args.input_size} px, {BACKBONE}, seed {SEED}, "
          f"fine-tunes {args.epochs} epochs; probe wall = its fit, after extracting the store "
          f"once ({extract_s:.0f} s this call, {stored.status})\n")
    print("| fraction | n_train | paradigm | test ACC | test AUC | trainable params | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    order = {"logreg": 0, "lora": 1, "finetune": 2}
    names = {"logreg": "linear probe", "lora": "LoRA (r=8)", "finetune": "full fine-tune"}
    for row in sorted(rows, key=lambda r: (r.key.fraction, order.get(r.key.method, 9))):
        if row.key.method not in order:
            continue
        trainable = (row.extra["trainable_params"] if row.key.method != "logreg"
                     else _probe_params())
        print(f"| {row.key.fraction:g} | {row.n_train} | {names[row.key.method]} | "
              f"{100 * row.acc:.1f} | {100 * row.auc:.1f} | {trainable:,} | {row.wall_s:.0f} |")


def _probe_params() -> int:
    """The probe's fitted parameters: binary logistic regression, one weight per feature and
    a bias."""
    import timm

    return timm.create_model("tf_efficientnet_lite0", num_classes=0).num_features + 1


if __name__ == "__main__":
    main()
