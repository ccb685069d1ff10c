"""The GPU figures of benchmarks/gpu_check.sh, one stage per call, each appended to a Markdown
report as table rows.

    python benchmarks/gpu_bench.py extract  --report R.md [--images 16384]
    python benchmarks/gpu_bench.py oom      --report R.md
    python benchmarks/gpu_bench.py finetune --report R.md

extract: for a ViT-B/16-shaped model (vit_base_patch16_224) and a CNN (resnet50), random weights,
  (a) model only: pooled pre-logits of ready (B, 3, 224, 224) tensors on the device, as medfm runs
      the model (channels_last, BatchNorm folded, bf16 autocast), after warm-up;
  (b) medfm end to end: `extract` of a synthetic 224 px RGB set (`--images` rows, PathMNIST
      layout, uncompressed npz), from the npz to a finished store, in a process already warmed up
      by an extraction of WARMUP_IMAGES such images with the same model (CUDA context, cuDNN's
      kernel choice for these shapes);
  images/s, (b)/(a), and the peak GPU memory of each.
oom: a ViT-B extraction of OOM_IMAGES such images asked for a batch that does not fit (the
  process may use OOM_GIB of the GPU), so it halves the batch until it fits; its features
  against a run at a batch that fits.
finetune: the same fine-tune (resnet18, real BreastMNIST, seed 0, recipe FINETUNE_RECIPE for 3
  epochs) run twice deterministic and twice not; are the test scores bit-identical?
--smoke runs every stage small, on the CPU too (to check the script, not to measure).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medfm.backbones import create_backbone
from medfm.data import SPLITS, get_dataset
from medfm.extract import extract
from medfm.extract.fold import fold_batchnorm
from medfm.store.features import FeatureStore
from medfm.synthetic import synthetic_arrays

MODELS = ("vit_base_patch16_224", "resnet50")  # ViT-B/16-shaped, and a CNN with BatchNorm
SMOKE_MODELS = ("test_vit", "test_resnet")  # --smoke: the same families, tiny
SIZE = 224  # the synthetic set's source size
BATCH = 256  # medfm's default CUDA batch
TIMED_BATCHES = 20  # model-only batches timed after WARMUP_BATCHES
WARMUP_BATCHES = 3
BASE_IMAGES = 512  # distinct synthetic images, tiled up to --images
WARMUP_IMAGES = 1024  # the warm-up extraction's set
OOM_IMAGES = 4096  # the oom stage's set
OOM_GIB = 3.0  # GPU memory the oom stage may use
OOM_BATCH = 2048  # the batch it asks for (ViT-B at 224 px needs far more than OOM_GIB)
FIT_BATCH = 64  # the batch its reference run uses
FINETUNE_RECIPE = "medfm-v1"  # epochs of batch 64: a short run whose length --epochs fixes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


class Report:
    """Appends lines to the Markdown report as they come (a stage cut short keeps its rows)."""

    def __init__(self, path: str):
        self.path = path

    def add(self, *lines: str) -> None:
        print(*lines, sep="\n", flush=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(f"{line}\n" for line in lines))


def write_large_set(root: Path, rows: int) -> Path:
    """A PathMNIST-layout 224 px RGB npz of `rows` images (4/5 train, 1/10 val, 1/10 test),
    tiled from BASE_IMAGES synthetic ones and stored uncompressed."""
    base, labels = synthetic_arrays("pathmnist", SIZE, min(BASE_IMAGES, rows))
    counts = (rows - 2 * (rows // 10), rows // 10, rows // 10)
    arrays = {}
    for split, n in zip(SPLITS, counts, strict=True):
        take = np.arange(n) % len(base)
        arrays[f"{split}_images"] = base[take]
        arrays[f"{split}_labels"] = labels[take]
    root.mkdir(parents=True, exist_ok=True)
    path = root / get_dataset("pathmnist").filename(SIZE)
    np.savez(path, **arrays)
    return path


def model_only(name: str, device: torch.device, batch: int, batches: int) -> tuple[float, float]:
    """(images/s, peak GiB) of the model alone on ready tensors at its input size, as medfm
    runs it."""
    bb = create_backbone(name, weights="random")
    model = bb.model.eval()
    fold_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    side = bb.data_config["input_size"][-1]
    x = torch.randn(batch, 3, side, side, device=device).contiguous(
        memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        for _ in range(WARMUP_BATCHES):
            model.forward_head(model.forward_features(x), pre_logits=True)
        _sync(device)
        _reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            model.forward_head(model.forward_features(x), pre_logits=True).float()
        _sync(device)
        seconds = time.perf_counter() - t0
    return batches * batch / seconds, _peak_gib(device)


def stage_extract(args, device: torch.device, report: Report) -> None:
    work = Path(args.workdir)
    started = time.perf_counter()
    write_large_set(work / "data", args.images)
    write_large_set(work / "warm-data", args.warmup_images)
    print(f"synthetic {args.images} x {SIZE} px set written in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    report.add("", f"### Extraction, {args.images} synthetic {SIZE} px RGB images, batch "
               f"{args.batch} ({device_label(device)})", "",
               "| model | (a) model only img/s | peak GiB | (b) end to end img/s | peak GiB | "
               "(b)/(a) | store |", "|---|---|---|---|---|---|---|")
    for name in args.models:
        a, a_peak = model_only(name, device, args.batch, args.timed_batches)
        common = dict(dataset="pathmnist", size=SIZE, backbone=name, weights="random",
                      device=str(device), batch_size=args.batch, progress=False, force=True)
        extract(data_root=work / "warm-data", workdir=work / "warm", **common)  # warm-up
        _reset_peak(device)
        result = extract(data_root=work / "data", workdir=work / "stores", **common)
        b_peak = _peak_gib(device)
        store = FeatureStore(result.path)
        line = (f"| {name} | {a:,.0f} | {a_peak:.1f} | {result.images_per_s:,.0f} | "
                f"{b_peak:.1f} | {result.images_per_s / a:.2f} | {store.summary()['rows']} rows, "
                f"{store.request.get('precision', 'float32')}, bn_folded "
                f"{store.attrs['bn_folded']} |")
        report.add(line)


def stage_oom(args, device: torch.device, report: Report) -> None:
    work = Path(args.workdir)
    write_large_set(work / "data", args.oom_images)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        index = torch.cuda.current_device() if device.index is None else device.index
        torch.cuda.set_per_process_memory_fraction(min(1.0, OOM_GIB * 2**30 / total), index)
    common = dict(dataset="pathmnist", size=SIZE, backbone=args.models[0], weights="random",
                  data_root=work / "data", device=str(device), progress=False, force=True)
    started = time.perf_counter()
    halved = extract(workdir=work / "oom", batch_size=args.oom_batch, **common)
    seconds = time.perf_counter() - started
    reference = extract(workdir=work / "fits", batch_size=FIT_BATCH, **common)
    a, b = FeatureStore(halved.path), FeatureStore(reference.path)
    gap = max(float(np.abs(a.features(s) - b.features(s)).max()) for s in SPLITS)
    scale = max(float(np.abs(b.features(s)).max()) for s in SPLITS)
    report.add("", "### Out of memory", "", "| what | outcome | check |", "|---|---|---|",
               f"| {args.models[0]}, {args.oom_images} images, batch {args.oom_batch} asked "
               f"within {OOM_GIB:g} GiB | finished at batch {a.attrs['batch_size']} in "
               f"{seconds:.1f} s | max abs difference from a batch-{FIT_BATCH} run {gap:.3g} "
               f"(features up to {scale:.3g}) |")


def stage_finetune(args, device: torch.device, report: Report) -> None:
    from medfm.finetune import finetune_job, resolve_finetune, resolve_recipe
    from medfm.sampling import SubsetSpec

    recipe = resolve_recipe(FINETUNE_RECIPE, epochs=args.epochs, batch_size=64,
                            resize_policy="native")
    request = resolve_finetune(dataset="breastmnist", size=28, backbone=args.finetune_backbone,
                               weights="random", spec=SubsetSpec(fraction=args.fraction, seed=0),
                               recipe=recipe, data_root=args.data_root)
    report.add("", f"### Fine-tune determinism: {args.finetune_backbone}, BreastMNIST 28 px "
               f"(fraction {args.fraction:g}), {args.epochs} epoch(s), seed 0, twice each "
               f"({device_label(device)})", "",
               "| mode | runs bit-identical | max abs score difference | test ACC / AUC | "
               "s per run |", "|---|---|---|---|---|")
    for deterministic in (True, False):
        scores, rows, seconds = [], [], []
        for run in range(2):
            started = time.perf_counter()
            workdir = Path(args.workdir) / f"finetune-{deterministic}-{run}"
            row, s, _ = finetune_job(request, device=str(device), workdir=workdir,
                                     progress=False, deterministic=deterministic)
            seconds.append(time.perf_counter() - started)
            scores.append(s)
            rows.append(row)
        same = bool(np.array_equal(scores[0], scores[1]))
        line = (f"| {'deterministic' if deterministic else 'default'} | {same} | "
                f"{float(np.abs(scores[0] - scores[1]).max()):.3g} | "
                f"{100 * rows[0].acc:.1f} / {100 * rows[0].auc:.1f} | "
                f"{np.mean(seconds):.1f} |")
        report.add(line)


def device_label(device: torch.device) -> str:
    from medfm.runtime import device_name

    return device_name(device)


STAGES = {"extract": stage_extract, "oom": stage_oom, "finetune": stage_finetune}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--report", required=True, help="Markdown file the rows are appended to")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medfm-gpu"))
    parser.add_argument("--data-root", default=os.environ.get("MEDFM_DATA_ROOT"),
                        help="where breastmnist.npz is (the finetune stage)")
    parser.add_argument("--images", type=int, default=16384, help="rows of the 224 px set")
    parser.add_argument("--smoke", action="store_true", help="every stage small (any device)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.batch, args.timed_batches = BATCH, TIMED_BATCHES
    args.oom_batch, args.epochs, args.models = OOM_BATCH, 3, MODELS
    args.warmup_images, args.oom_images = WARMUP_IMAGES, OOM_IMAGES
    args.finetune_backbone, args.fraction = "resnet18", 1.0
    if args.smoke:
        args.images, args.batch, args.timed_batches = 64, 8, 2
        args.oom_batch, args.epochs, args.models = 16, 1, SMOKE_MODELS
        args.warmup_images, args.oom_images = 16, 32
        args.finetune_backbone, args.fraction = "test_resnet", 0.1
    STAGES[args.stage](args, device, Report(args.report))


if __name__ == "__main__":
    main()
