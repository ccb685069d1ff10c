import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medfm.errors import InvalidArgumentError
from medfm.preprocess import (
    DevicePreprocessor,
    PreprocessConfig,
    PreprocessRequest,
    resolve_preprocess,
)

TIMM_CFG = {"input_size": (3, 224, 224), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}


def test_resolution_order_user_over_backbone_over_default():
    cfg = resolve_preprocess(TIMM_CFG)
    assert cfg == PreprocessConfig(224, "bilinear", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    cfg = resolve_preprocess(TIMM_CFG, resize_policy="bicubic", input_size=96)
    assert (cfg.input_size, cfg.resize_policy) == (96, "bicubic")
    assert resolve_preprocess({}).mean == (0.485, 0.456, 0.406)
    assert resolve_preprocess(TIMM_CFG, resize_policy="native", source_size=28).input_size == 28


def test_requests_merge_field_by_field_and_resolve_like_the_function():
    recipe = PreprocessRequest(resize_policy="native", normalize="half")
    user = PreprocessRequest(input_size=64, resize_policy="bilinear")
    merged = recipe.merged(user)
    assert merged == PreprocessRequest(resize_policy="bilinear", input_size=64, normalize="half")
    assert recipe.merged(None) == recipe and PreprocessRequest().merged(recipe) == recipe
    cfg = merged.resolve(TIMM_CFG, source_size=28)
    assert cfg == PreprocessConfig(64, "bilinear", (0.5,) * 3, (0.5,) * 3)
    assert PreprocessRequest().resolve(TIMM_CFG) == resolve_preprocess(TIMM_CFG)
    with pytest.raises(InvalidArgumentError, match="normalization"):
        PreprocessRequest(normalize="zscore")
    with pytest.raises(InvalidArgumentError, match="positive integer"):
        PreprocessRequest(input_size=0)


def test_bad_policy_and_impossible_pad_are_clear_errors():
    with pytest.raises(InvalidArgumentError, match="bilinear"):
        resolve_preprocess(TIMM_CFG, resize_policy="stretch")
    with pytest.raises(InvalidArgumentError, match="zero-pad"):
        resolve_preprocess(TIMM_CFG, resize_policy="pad", input_size=64, source_size=128)


def _prep(policy, size=56, mean=(0.5,) * 3, std=(0.5,) * 3):
    return DevicePreprocessor(PreprocessConfig(size, policy, mean, std), "cpu")


def test_grayscale_becomes_three_identical_normalized_channels():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    x = _prep("bilinear")(images)
    assert x.shape == (4, 3, 56, 56) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x[:, 0], x[:, 2])
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6


def test_rgb_channel_order_and_per_channel_normalization():
    images = torch.zeros((2, 28, 28, 3), dtype=torch.uint8)
    images[..., 0] = 255
    x = _prep("nearest", mean=(0.5, 0.0, 0.0), std=(0.5, 1.0, 1.0))(images)
    assert torch.allclose(x[:, 0], torch.ones(1)) and torch.allclose(x[:, 1], torch.zeros(1))


def test_pad_centres_the_image_in_a_zero_canvas():
    images = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    x = _prep("pad", size=56, mean=(0.0,) * 3, std=(1.0,) * 3)(images)
    assert x[0, 0, 14:42, 14:42].eq(1.0).all()
    assert x[0, 0, :14].eq(0.0).all() and x[0, 0, 42:].eq(0.0).all()
    assert x[0, 0, :, :14].eq(0.0).all()


def test_nearest_repeats_pixels_and_bilinear_matches_interpolate():
    images = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    unit = dict(mean=(0.0,) * 3, std=(1.0,) * 3)
    near = _prep("nearest", **unit)(images)
    assert torch.equal(near[:, 0, ::2, ::2], images.float() / 255)
    bil = _prep("bilinear", **unit)(images)
    ref = F.interpolate(images[:, None].float() / 255, size=(56, 56), mode="bilinear",
                        align_corners=False)
    torch.testing.assert_close(bil[:, :1], ref)


def test_native_keeps_source_size():
    images = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8)
    x = DevicePreprocessor(resolve_preprocess(TIMM_CFG, resize_policy="native", source_size=28))(
        images)
    assert x.shape == (2, 3, 28, 28)


def test_float_input_is_refused():
    with pytest.raises(TypeError):
        _prep("bilinear")(torch.from_numpy(np.zeros((1, 28, 28), dtype=np.float32)))
