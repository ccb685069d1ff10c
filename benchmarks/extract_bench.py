"""Extraction throughput, side by side in one run: model alone vs medfm vs a naive pipeline.

    MEDFM_DATA_ROOT=../shared/data/medmnist python benchmarks/extract_bench.py [--device cuda]

For tf_efficientnet_lite0 (ImageNet weights) on BreastMNIST (780 images) at model input 28 and
224 px it prints images/s of
  (a) model-only forward on normalized tensors already on the device, the same model medfm runs
      (channels_last, BatchNorm folded); (a0) the same without folding, for reference,
  (b) medfm end to end: npz -> device preprocessing -> features -> finished HDF5 store,
  (c) a naive pipeline as the reference codes do: DataLoader over medmnist's PIL dataset with
      per-image torchvision Resize/ToTensor/Normalize, model in default memory format,
and the ratios (b)/(a) (target >= 0.9) and (b)/(c) (target >= 2 at 224).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch

from medfm.backbones import create_backbone
from medfm.extract import extract
from medfm.extract.fold import fold_batchnorm

BACKBONE = "tf_efficientnet_lite0.in1k"
DATASET = "breastmnist"
BATCH = 32  # the brief's CPU reference batch


def model_only(model, size: int, device: torch.device, n_images: int, fold: bool) -> float:
    """(a): images/s of forward_features + pooled head on ready (B, 3, S, S) tensors."""
    if fold:
        model = copy.deepcopy(model).eval()
        fold_batchnorm(model)
    x = torch.randn(BATCH, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    m = model.to(device, memory_format=torch.channels_last).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        m.forward_head(m.forward_features(x), pre_logits=True)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(max(1, n_images // BATCH)):
            m.forward_head(m.forward_features(x), pre_logits=True).float().cpu()
        _sync(device)
    return max(1, n_images // BATCH) * BATCH / (time.perf_counter() - t0)


def medfm_end_to_end(size: int, device: str, workdir: str) -> tuple[float, int]:
    """(b): images/s of a full `extract` (model load excluded: the rate is over the image loop)."""
    t0 = time.perf_counter()
    result = extract(dataset=DATASET, size=28, backbone=BACKBONE, input_size=size,
                     resize_policy="bilinear" if size != 28 else "native", device=device,
                     batch_size=BATCH, workdir=workdir, force=True, progress=False)
    rows = sum(int(r) for r in result.summary["rows"].split("/"))
    print(f"    (b) wall incl. model load and store write: {time.perf_counter() - t0:.1f} s")
    return result.images_per_s, rows


def naive(model, size: int, device: torch.device, data_root: str) -> float:
    """(c): torchvision per-image transforms on PIL images, DataLoader, plain memory format."""
    import medmnist
    from torch.utils.data import ConcatDataset, DataLoader
    from torchvision import transforms

    cfg = model.pretrained_cfg
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize(cfg["mean"], cfg["std"])])
    splits = [medmnist.BreastMNIST(split=s, root=data_root, size=28, download=False,
                                   as_rgb=True, transform=tf) for s in ("train", "val", "test")]
    loader = DataLoader(ConcatDataset(splits), batch_size=BATCH, shuffle=False)
    m = model.to(device, memory_format=torch.contiguous_format).eval()
    n = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            m.forward_head(m.forward_features(x.to(device)), pre_logits=True).cpu()
            n += len(x)
    return n / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="28,224")
    args = parser.parse_args()
    data_root = os.environ.get("MEDFM_DATA_ROOT", "../shared/data/medmnist")
    os.environ["MEDFM_DATA_ROOT"] = data_root
    device = torch.device(args.device)
    print(f"extract_bench: {BACKBONE} on {DATASET}, batch {BATCH}, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as workdir:
        for size in (int(s) for s in args.sizes.split(",")):
            model = create_backbone(BACKBONE).model
            print(f"  input {size} px")
            b, rows = medfm_end_to_end(size, args.device, workdir)
            n_images = max(rows // 2, BATCH * 4)
            a = model_only(model, size, device, n_images, fold=True)
            a0 = model_only(model, size, device, n_images, fold=False)
            c = naive(model, size, device, data_root)
            print(f"    (a0) model only, BN not folded {a0:9.1f} img/s")
            print(f"    (a) model only  {a:9.1f} img/s")
            print(f"    (b) medfm       {b:9.1f} img/s   (b)/(a) = {b / a:.2f}  (target >= 0.9)")
            print(f"    (c) naive       {c:9.1f} img/s   (b)/(c) = {b / c:.2f}"
                  f"{'  (target >= 2)' if size == 224 else ''}")


if __name__ == "__main__":
    main()
