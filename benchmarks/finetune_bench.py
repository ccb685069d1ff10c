"""Training throughput, side by side in one run: medfm's fine-tuning loop vs the model's own
training step vs a naive loop.

    MEDFM_DATA_ROOT=../shared/data/medmnist python benchmarks/finetune_bench.py
    MEDFM_DATA_ROOT=... python benchmarks/finetune_bench.py --device cuda [--compile]

Same model (timm, seeded random init, 2-way head), same optimizer (Adam, lr 1e-3, the
medmnist-v2 recipe) and batch size BATCH. On the CPU (default): resnet18 on the BreastMNIST train
split at 28 and 64 px, fed at its own size. With `--device cuda`: ResNet-50 and ViT-B/16 at
224 px, on the PneumoniaMNIST-28 train split (4,708 images) upsampled to 224 (bilinear, on the
device for medfm, per image on the CPU for the naive loop), bf16 autocast. It prints training
images/s (forward + backward + step; validation excluded) of
  (a) medfm: `medfm.finetune.train` with uint8 batches sliced from the npz arrays by a seeded
      permutation, preprocessed on the device, channels_last (bf16 autocast on CUDA), its last
      epoch of EPOCHS (the first warms up);
  (s) the model's own step: forward, backward and optimizer step on one ready (B, 3, S, S)
      batch already on the device, as medfm runs the model (channels_last, bf16 autocast on
      CUDA), STEP_BATCHES steps after STEP_WARMUP: the ceiling of any loop;
  (b) naive, as the reference codes do: a DataLoader over medmnist's PIL dataset with per-image
      torchvision Resize/ToTensor/Normalize, float32 NCHW batches, default memory format,
      NAIVE_BATCHES batches after one;
and the ratios (a)/(s) (issue 28's target on a GPU: >= 0.9) and (a)/(b). `--compile` adds (a)
and (s) with the model torch.compile-d (their first steps compile; not timed). `--smoke`: one
tiny row (test_resnet, BreastMNIST-28) and few steps, on any device, to check the script.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import medmnist
import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms

from medfm.backbones import create_backbone
from medfm.data import get_dataset, load_split
from medfm.finetune import Split, train
from medfm.resolve.recipes import resolve_recipe
from medfm.paths import resolve_data_root
from medfm.preprocess import resolve_preprocess
from medfm.runtime import resolve_device

BATCH = 128  # the medmnist-v2 recipe's batch
EPOCHS = 2  # medfm's loop: the first warms up (allocator, kernels, compilation); the last is timed
STEP_WARMUP, STEP_BATCHES = 3, 20  # the model's own step: untimed, then timed steps
NAIVE_BATCHES = 10  # naive loop: timed batches after one untimed
NAIVE_WORKERS = 0  # DataLoader workers for the naive loop (0: in the training process)


@dataclass(frozen=True)
class Setup:
    """One row of the table: a model fed one dataset's train split at one input size."""

    backbone: str
    dataset: str
    size: int  # source size of the npz file
    input_size: int  # model input side
    policy: str  # "native" (fed as stored) or "bilinear" (upsampled)


CPU_SETUPS = (Setup("resnet18", "breastmnist", 28, 28, "native"),
              Setup("resnet18", "breastmnist", 64, 64, "native"))
CUDA_SETUPS = (Setup("resnet50", "pneumoniamnist", 28, 224, "bilinear"),
               Setup("vit_base_patch16_224", "pneumoniamnist", 28, 224, "bilinear"))
SMOKE_SETUPS = (Setup("test_resnet", "breastmnist", 28, 28, "native"),)


def _model(setup: Setup) -> torch.nn.Module:
    return create_backbone(setup.backbone, weights="random", num_classes=2).model


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def medfm_rate(setup: Setup, device: torch.device, data_root, compile: bool = False) -> float:
    """(a): images/s of medfm's loop in its last epoch, as its curves record it."""
    recipe = resolve_recipe("medmnist-v2", epochs=EPOCHS, batch_size=BATCH, stem="default")
    bb = create_backbone(setup.backbone, weights="random", num_classes=2)
    cfg = resolve_preprocess(bb.data_config, resize_policy=setup.policy,
                             input_size=setup.input_size, mean=(0.5,) * 3, std=(0.5,) * 3,
                             source_size=setup.size)
    outcome = train(bb.model, recipe=recipe, task=get_dataset(setup.dataset).task,
                    train=Split(*load_split(setup.dataset, setup.size, "train", data_root)),
                    val=Split(*load_split(setup.dataset, setup.size, "val", data_root)),
                    preprocess=cfg, device=device, seed=0, progress=False, compile=compile)
    return outcome.curves[-1]["img_s"]


def step_rate(setup: Setup, device: torch.device, compile: bool = False,
              batches: int = STEP_BATCHES) -> float:
    """(s): images/s of the model's own training step on a ready batch on the device."""
    model = _model(setup).to(device, memory_format=torch.channels_last).train()
    if compile:
        model.compile(dynamic=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    side = setup.input_size
    x = torch.randn(BATCH, 3, side, side, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 2, (BATCH,), device=device)

    def step() -> None:
        with _autocast(device):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(STEP_WARMUP):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    _sync(device)
    return batches * BATCH / (time.perf_counter() - t0)


def naive_rate(setup: Setup, device: torch.device, data_root,
               batches: int = NAIVE_BATCHES) -> float:
    """(b): images/s of a reference-style loop over `batches` batches."""
    steps = [transforms.Resize(setup.input_size)] if setup.input_size != setup.size else []
    tf = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    cls = getattr(medmnist, get_dataset(setup.dataset).python_class)
    data = cls(split="train", root=str(data_root), size=setup.size, download=False, transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True,
                                         num_workers=NAIVE_WORKERS)
    model = _model(setup).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen, t0 = 0, None
    while t0 is None or seen < batches * BATCH:
        for x, y in loader:
            x = x.to(device).expand(-1, 3, -1, -1)  # grayscale -> 3 channels, as medfm feeds
            with _autocast(device):
                loss = F.cross_entropy(model(x), y[:, 0].long().to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if t0 is None:  # the first batch warms up
                _sync(device)
                t0 = time.perf_counter()
                continue
            seen += len(x)
            if seen >= batches * BATCH:
                break
    _sync(device)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--compile", action="store_true", help="add torch.compile-d columns")
    parser.add_argument("--smoke", action="store_true", help="one tiny row (checks the script)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data_root = resolve_data_root(args.data_root)
    setups = CUDA_SETUPS if device.type == "cuda" else CPU_SETUPS
    step_batches, naive_batches = (2, 2) if args.smoke else (STEP_BATCHES, NAIVE_BATCHES)
    if args.smoke:
        setups = SMOKE_SETUPS
    print(f"random init, batch {BATCH}, device {device}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    head = f"{'model':<22}{'data':<18}{'px':>4} {'(a) medfm':>10} {'(s) step':>9} {'(b) naive':>10}"
    head += f" {'a/s':>5} {'a/b':>5}"
    if args.compile:
        head += f" {'(a) comp':>9} {'(s) comp':>9} {'a/s comp':>8}"
    print(head)
    for setup in setups:
        torch.manual_seed(0)
        np.random.seed(0)
        fast = medfm_rate(setup, device, data_root)
        ceiling = step_rate(setup, device, batches=step_batches)
        slow = naive_rate(setup, device, data_root, batches=naive_batches)
        line = (f"{setup.backbone:<22}{setup.dataset + '@' + str(setup.size):<18}"
                f"{setup.input_size:>4} {fast:>10.1f} {ceiling:>9.1f} {slow:>10.1f} "
                f"{fast / ceiling:>5.2f} {fast / slow:>5.2f}")
        if args.compile:
            fast_c = medfm_rate(setup, device, data_root, compile=True)
            ceiling_c = step_rate(setup, device, compile=True, batches=step_batches)
            line += f" {fast_c:>9.1f} {ceiling_c:>9.1f} {fast_c / ceiling_c:>8.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
