"""Fold eval-mode BatchNorm into the convolution before it: the frozen extractor's free speed-up.

A frozen backbone in eval mode computes conv -> BN(running stats) -> act; the BN is an affine map
per channel, so it folds exactly into the conv's weights and bias, and one full pass over every
activation tensor disappears (1.4x for EfficientNet-Lite0 at 224 px on a 2-core CPU, see
docs/benchmarks.md). A pair qualifies when a Conv2d is immediately followed, in its parent's
registration order, by a BatchNorm2d of matching width (timm's BatchNormAct2d keeps its dropout
and activation). Registration order is not forward order in every model, so `fold_verified`
checks the folded model against the original and keeps the original if they disagree.

The check. Both models run in float64 on the same batch (`check_batch`: the first chunk's first
FOLD_CHECK images and FOLD_NOISE images of seeded uniform noise), so what is measured is the
difference between the two functions, not float32, TF32 or bf16 rounding: a right fold differs
by the rounding of its folded weights (~1e-7 relative), a wrong one by a share of the features.
One check decides for the whole store: a right fold is an identity that holds for every input,
and a wrong one changes the output of generic inputs, which the noise images are whatever the
first chunk holds (blank, constant or padded images can hide a wrong fold; noise cannot).
Checking later chunks would repeat the same test at the cost of running the unfolded model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

FOLD_RTOL = 1e-4  # max |folded - original| relative to max |original|, both in float64
FOLD_CHECK = 8  # images of the first chunk in the check batch
FOLD_NOISE = 4  # images of seeded uniform noise in the check batch
FOLD_NOISE_SEED = 0  # so every run checks (and folds) the same way


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every (Conv2d, BatchNorm2d) pair of `module` in place; returns how many were folded."""
    folded = 0
    names = list(module._modules)
    for i, name in enumerate(names):
        child = module._modules[name]
        after = module._modules[names[i + 1]] if i + 1 < len(names) else None
        if (isinstance(child, nn.Conv2d) and isinstance(after, nn.BatchNorm2d)
                and after.num_features == child.out_channels and after.track_running_stats):
            module._modules[name] = fuse_conv_bn_eval(child.eval(), after.eval())
            rest = [m for m in (getattr(after, "drop", None), getattr(after, "act", None))
                    if m is not None]  # BatchNormAct2d: BN, then dropout and activation
            module._modules[names[i + 1]] = nn.Sequential(*rest) if rest else nn.Identity()
            folded += 1
        elif child is not None:
            folded += fold_batchnorm(child)
    return folded


def check_batch(chunk: torch.Tensor) -> torch.Tensor:
    """The uint8 images a fold is checked on: the first FOLD_CHECK of `chunk` (B, H, W[, 3]),
    then FOLD_NOISE images of seeded uniform noise of the same shape, on `chunk`'s device."""
    generator = torch.Generator().manual_seed(FOLD_NOISE_SEED)
    noise = torch.randint(0, 256, (FOLD_NOISE, *chunk.shape[1:]), dtype=torch.uint8,
                          generator=generator)
    return torch.cat([chunk[:FOLD_CHECK], noise.to(chunk.device)])


def _features64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits of a float64 copy of `model` on float64 `x` (no TF32, no autocast)."""
    twin = copy.deepcopy(model).double()
    with torch.autocast(x.device.type, enabled=False):
        return twin.forward_head(twin.forward_features(x.double()), pre_logits=True)


@torch.inference_mode()
def fold_verified(model: nn.Module, sample: torch.Tensor) -> tuple[nn.Module, int]:
    """(model with BN folded, number folded), or (model, 0) if folding changes the features.

    `sample` is a preprocessed (B, 3, S, S) float batch on the model's device (check_batch's
    images); both models are compared in float64 (module docstring).
    """
    folded_model = copy.deepcopy(model).eval()
    n = fold_batchnorm(folded_model)
    if n == 0:
        return model, 0
    reference = _features64(model, sample)
    candidate = _features64(folded_model, sample)
    error = (candidate - reference).abs().max()
    if not torch.isfinite(candidate).all() or error > FOLD_RTOL * reference.abs().max():
        return model, 0
    return folded_model, n
