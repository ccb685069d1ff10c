import copy

import pytest
import torch
from torch import nn

from medfm.backbones import create_backbone
from medfm.extract.fold import fold_batchnorm, fold_verified


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
