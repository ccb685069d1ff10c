"""BatchNorm folding for frozen extraction: exact where the pair is a real conv -> BN, refused
where it is not (issue 15 item 8: checked in float64, on images a blank first chunk cannot fool).
"""

import copy

import pytest
import torch
from torch import nn

from medfm.backbones import create_backbone
from medfm.extract.fold import (
    FOLD_NOISE,
    FOLD_RTOL,
    check_batch,
    fold_batchnorm,
    fold_verified,
)


def _features(model, x):
    with torch.inference_mode():
        return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_folding_removes_batchnorm_and_keeps_features(name):
    model = create_backbone(name, weights="random").model.eval()
    for m in model.modules():  # non-trivial running statistics, as after pretraining
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 32, 32)
    folded = copy.deepcopy(model)
    n = fold_batchnorm(folded)
    assert n > 0
    remaining = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(remaining) < sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(_features(folded, x), _features(model, x), rtol=1e-4, atol=1e-4)


def test_models_without_batchnorm_are_left_alone():
    model = create_backbone("test_vit", weights="random").model.eval()
    same, n = fold_verified(model, torch.randn(2, 3, 160, 160))
    assert n == 0 and same is model


class _LyingOrder(nn.Module):
    """conv then bn in registration order, but forward applies bn to the input first."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.bn.running_mean.fill_(2.0)
        self.bn.running_var.fill_(4.0)
        self.num_features = 3

    def forward_features(self, x):
        return self.conv(self.bn(x))

    def forward_head(self, x, pre_logits=True):
        return x.mean((2, 3))


def test_a_fold_that_changes_features_is_rejected():
    model = _LyingOrder().eval()
    kept, n = fold_verified(model, torch.randn(2, 3, 8, 8))
    assert n == 0 and kept is model


class _ReluBetween(nn.Module):
    """conv and bn adjacent in registration order, but forward puts a ReLU between them: the
    fold is wrong exactly where the conv's output is negative (bn's shift keeps it visible)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        nn.init.constant_(self.conv.weight, -0.1)  # weights sum to > 0: a blank (constant)
        self.conv.weight.data[:, :, 1, 1] = 1.0  # image gives > 0 everywhere, noise not
        self.bn.running_mean.fill_(0.3)
        self.bn.running_var.fill_(0.25)
        self.bn.bias.data.fill_(1.0)
        self.num_features = 4

    def forward_features(self, x):
        return self.bn(torch.relu(self.conv(x)))

    def forward_head(self, x, pre_logits=True):
        return x.flatten(1)


def test_a_blank_first_chunk_cannot_hide_a_wrong_fold():
    """MedMNIST splits can open on blank or padded images; on those this wrong fold is exact.
    The check batch adds seeded noise images, on which it is not."""
    blank = torch.full((8, 8, 8, 3), 200, dtype=torch.uint8)  # (B, H, W, 3) as stored
    as_input = lambda images: images.permute(0, 3, 1, 2).float() / 255  # noqa: E731
    model = _ReluBetween().eval()
    _, n = fold_verified(model, as_input(blank))
    assert n == 1  # the first chunk alone cannot tell
    batch = check_batch(blank)
    assert batch.shape == (8 + FOLD_NOISE, 8, 8, 3) and torch.equal(batch[:8], blank)
    assert torch.equal(batch, check_batch(blank))  # seeded: every run checks the same images
    kept, n = fold_verified(model, as_input(batch))
    assert n == 0 and kept is model


class _IllConditioned(nn.Module):
    """conv -> bn whose fold is exact in its weights (scale 1, dyadic shifts), then a head that
    amplifies the last bits of the features (sin of a million times them): float32 rounding
    alone, adding the shifts in another order, moves the features by a share of themselves."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv.bias.data.fill_(0.5)
        self.bn = nn.BatchNorm2d(4, eps=0.0)  # running_var 1, weight 1: scale exactly 1
        self.bn.running_mean.fill_(0.25)
        self.bn.bias.data.fill_(0.125)
        self.num_features = 4

    def forward_features(self, x):
        return self.bn(self.conv(x))

    def forward_head(self, x, pre_logits=True):
        return torch.sin(x.mean((2, 3)) * 1e6)


def test_the_check_is_in_float64_so_rounding_never_rejects_a_right_fold():
    torch.manual_seed(0)
    model = _IllConditioned().eval()
    x = torch.randn(12, 3, 8, 8)
    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    float32_gap = (_features(folded, x) - _features(model, x)).abs().max()
    assert float32_gap > FOLD_RTOL * _features(model, x).abs().max()  # float32 would reject it
    kept, n = fold_verified(model, x)
    assert n == 1 and kept is not model
    assert next(kept.parameters()).dtype == torch.float32  # the kept model is the float32 one


@pytest.mark.gpu
def test_tf32_on_cuda_does_not_reject_a_right_fold():
    model = create_backbone("test_resnet", weights="random").model.eval().cuda()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _, n = fold_verified(model, torch.randn(12, 3, 64, 64, device="cuda"))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert n > 0
