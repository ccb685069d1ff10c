"""Training throughput, side by side in one run: medfm's fine-tuning loop vs a naive loop.

    MEDFM_DATA_ROOT=../shared/data/medmnist python benchmarks/finetune_bench.py [--device cuda]

Same model (timm resnet18, seeded random init, 2-way head), same optimizer (Adam, lr 1e-3, the
medmnist-v2 recipe) and batch size, on the BreastMNIST train split at 28 and 64 px (input fed at
its own size). It prints training images/s (forward + backward + step; validation excluded) of
  (a) medfm: `medfm.finetune.train` with uint8 batches sliced from the npz arrays by a seeded
      permutation, preprocessed on the device, channels_last (bf16 autocast on CUDA);
  (b) naive, as the reference codes do: a DataLoader over medmnist's PIL dataset with per-image
      torchvision ToTensor/Normalize, float32 NCHW batches, default memory format;
and the ratio (a)/(b). Each loop runs EPOCHS epochs; the last one is timed.
"""

from __future__ import annotations

import argparse
import os
import time

import medmnist
import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms

from medfm.backbones import create_backbone
from medfm.data import get_dataset, load_split
from medfm.runtime import resolve_device
from medfm.finetune import Split, resolve_recipe, train
from medfm.paths import resolve_data_root
from medfm.preprocess import resolve_preprocess

DATASET = "breastmnist"
BACKBONE = "resnet18"
SIZES = (28, 64)
BATCH = 128  # the medmnist-v2 recipe's batch
EPOCHS = 2  # the first warms up (allocator, kernels); the last is timed
NAIVE_WORKERS = 0  # DataLoader workers for the naive loop (0: in the training process)


def _model() -> torch.nn.Module:
    return create_backbone(BACKBONE, weights="random", num_classes=2).model


def medfm_rate(size: int, device: torch.device, data_root) -> float:
    """(a): images/s of medfm's loop in its last epoch, as its curves record it."""
    recipe = resolve_recipe("medmnist-v2", epochs=EPOCHS, batch_size=BATCH, stem="default")
    bb = create_backbone(BACKBONE, weights="random", num_classes=2)
    cfg = resolve_preprocess(bb.data_config, resize_policy="native", mean=(0.5,) * 3,
                             std=(0.5,) * 3, source_size=size)
    outcome = train(bb.model, recipe=recipe, task=get_dataset(DATASET).task,
                    train=Split(*load_split(DATASET, size, "train", data_root)),
                    val=Split(*load_split(DATASET, size, "val", data_root)),
                    preprocess=cfg, device=device, seed=0, progress=False)
    return outcome.curves[-1]["img_s"]


def naive_rate(size: int, device: torch.device, data_root) -> float:
    """(b): images/s of a reference-style loop in its last epoch."""
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    data = medmnist.BreastMNIST(split="train", root=str(data_root), size=size,
                                download=False, transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True,
                                         num_workers=NAIVE_WORKERS)
    model = _model().to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rate = 0.0
    for _ in range(EPOCHS):
        seen, t0 = 0, time.perf_counter()
        for x, y in loader:
            x = x.to(device).expand(-1, 3, -1, -1)  # grayscale -> 3 channels, as medfm feeds
            loss = F.cross_entropy(model(x), y[:, 0].long().to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = seen / (time.perf_counter() - t0)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    data_root = resolve_data_root(args.data_root)
    print(f"{BACKBONE} (random init), {DATASET} train, batch {BATCH}, device {device}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'px':>4} {'medfm img/s':>12} {'naive img/s':>12} {'ratio':>6}")
    for size in SIZES:
        torch.manual_seed(0)
        np.random.seed(0)
        fast = medfm_rate(size, device, data_root)
        slow = naive_rate(size, device, data_root)
        print(f"{size:>4} {fast:>12.1f} {slow:>12.1f} {fast / slow:>6.2f}")


if __name__ == "__main__":
    main()
