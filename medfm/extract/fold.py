"""Fold eval-mode BatchNorm into the convolution before it: the frozen extractor's free speed-up.

A frozen backbone in eval mode computes conv -> BN(running stats) -> act; the BN is an affine map
per channel, so it folds exactly into the conv's weights and bias, and one full pass over every
activation tensor disappears (1.4x for EfficientNet-Lite0 at 224 px on a 2-core CPU, see
docs/benchmarks.md). A pair qualifies when a Conv2d is immediately followed, in its parent's
registration order, by a BatchNorm2d of matching width (timm's BatchNormAct2d keeps its dropout
and activation). Registration order is not forward order in every model, so `fold_verified`
checks the folded model against the original on a real batch and keeps the original if they
disagree.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

FOLD_RTOL = 1e-3  # max |folded - original| relative to max |original| on the check batch


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


@torch.inference_mode()
def fold_verified(model: nn.Module, sample: torch.Tensor) -> tuple[nn.Module, int]:
    """(model with BN folded, number folded), or (model, 0) if folding changes the features.

    `sample` is a preprocessed (B, 3, S, S) batch on the model's device.
    """
    folded_model = copy.deepcopy(model).eval()
    n = fold_batchnorm(folded_model)
    if n == 0:
        return model, 0
    reference = model.forward_head(model.forward_features(sample), pre_logits=True).float()
    candidate = folded_model.forward_head(folded_model.forward_features(sample),
                                          pre_logits=True).float()
    error = (candidate - reference).abs().max()
    if not torch.isfinite(candidate).all() or error > FOLD_RTOL * reference.abs().max():
        return model, 0
    return folded_model, n
