"""Device-side preprocessing shared by extract and finetune: uint8 batches in, model input out.

    request = PreprocessRequest(resize_policy="pad")           # what the user (or recipe) asked
    cfg = request.resolve(backbone.data_config, source_size=28)   # -> PreprocessConfig
    prep = DevicePreprocessor(cfg, device="cuda")
    x = prep(torch.from_numpy(images[i:j]))  # (B, H, W[, 3]) uint8 -> (B, 3, S, S) float

Images travel to the device as uint8 (4x less to copy than float), and every per-pixel step runs
there on whole batches: convert, resize by policy, grayscale -> 3 channels, normalize with the
backbone's mean/std. One `PreprocessRequest` (policy, input size, normalization; None = the
default) serves extract, fine-tune recipes and grid specs alike; requests merge field by field
(`recipe.preprocess.merged(user_request)`), and the resolved config is part of every store's and
result's identity.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from medfm.errors import InvalidArgumentError
from medfm.limits import INPUT_SIZE_MAX, check_at_most

if TYPE_CHECKING:
    import torch

RESIZE_POLICIES = ("bilinear", "bicubic", "nearest", "pad", "native", "pad-norm")
PAD_POLICIES = ("pad", "pad-norm")  # centre the image in a zero canvas: black (pad), or the
#  normalized zero, i.e. the mean colour (pad-norm: normalize first, as MedMNIST+'s transforms)
DEFAULT_RESIZE_POLICY = "bilinear"  # the seed paper's choice: upsample to the backbone's input size
NORMALIZATIONS = ("backbone", "half")  # the backbone's mean/std, or mean = std = 0.5 (MedMNIST v2)
DEFAULT_NORMALIZATION = "backbone"
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # normalize="half"
DEFAULT_MEAN = (0.485, 0.456, 0.406)  # ImageNet, when the backbone's config has none
DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    """How uint8 MedMNIST images become model input; stored verbatim with every feature store."""

    input_size: int  # side of the square model input, pixels
    resize_policy: str  # one of RESIZE_POLICIES
    mean: tuple[float, float, float]  # per-channel mean, on [0, 1] pixels
    std: tuple[float, float, float]  # per-channel std, on [0, 1] pixels

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class PreprocessRequest:
    """How the user (or a recipe, or a grid spec) asks images to be prepared; None = default."""

    resize_policy: str | None = None  # one of RESIZE_POLICIES; None: bilinear
    input_size: int | None = None  # model input side; None: the backbone's (native: the source's)
    normalize: str | None = None  # one of NORMALIZATIONS; None: the backbone's mean/std

    def __post_init__(self) -> None:
        if self.resize_policy is not None:
            check_resize_policy(self.resize_policy)
        if self.normalize is not None and self.normalize not in NORMALIZATIONS:
            raise InvalidArgumentError(
                f"normalization {self.normalize!r} is not one of {', '.join(NORMALIZATIONS)}.")
        if self.input_size is not None:
            size = self.input_size
            if isinstance(size, bool) or not isinstance(size, numbers.Real) or (
                    not math.isfinite(size)) or int(size) != size or size <= 0:
                raise InvalidArgumentError(
                    f"input size {self.input_size!r} must be a positive integer.")
            object.__setattr__(self, "input_size",
                               check_at_most(int(size), INPUT_SIZE_MAX, "input size"))

    def merged(self, override: PreprocessRequest | None) -> PreprocessRequest:
        """This request with every field that `override` sets replaced by the override's."""
        if override is None:
            return self
        return PreprocessRequest(**{
            name: getattr(override, name) if getattr(override, name) is not None
            else getattr(self, name) for name in ("resize_policy", "input_size", "normalize")})

    def resolve(self, data_config: dict, *, source_size: int | None = None) -> PreprocessConfig:
        """The concrete config for a backbone's data config (see `resolve_preprocess`)."""
        mean, std = HALF_MEAN_STD if self.normalize == "half" else (None, None)
        return resolve_preprocess(data_config, input_size=self.input_size,
                                  resize_policy=self.resize_policy, mean=mean, std=std,
                                  source_size=source_size)


def check_resize_policy(policy: str) -> str:
    if policy not in RESIZE_POLICIES:
        raise InvalidArgumentError(
            f"resize policy {policy!r} is not one of {', '.join(RESIZE_POLICIES)}."
        )
    return policy


def resolve_preprocess(
    data_config: dict,
    *,
    input_size: int | None = None,
    resize_policy: str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    source_size: int | None = None,
) -> PreprocessConfig:
    """Resolve the preprocessing config: user arguments > backbone data config > medfm defaults.

    `data_config` is timm's resolved data config (keys `input_size` (C, H, W), `mean`, `std`),
    possibly overridden by a medfm alias (e.g. DINOv2 at 518 px). `native` feeds `source_size`.
    """
    policy = check_resize_policy(resize_policy or DEFAULT_RESIZE_POLICY)
    if input_size is not None:  # 0 or -1 is an error, never "the backbone's size"
        input_size = PreprocessRequest(input_size=input_size).input_size
    if policy == "native":
        if source_size is None:
            raise InvalidArgumentError("resize policy 'native' needs the source image size.")
        size = int(source_size)
    else:
        size = int(input_size if input_size is not None
                   else data_config.get("input_size", (3, 224, 224))[-1])
    if size <= 0:
        raise InvalidArgumentError(f"input size {size} must be positive.")
    if policy in PAD_POLICIES and source_size is not None and source_size > size:
        raise InvalidArgumentError(
            f"cannot zero-pad {source_size} px images into a {size} px canvas; "
            f"use a larger --input-size or another --resize-policy."
        )
    mean = tuple(float(m) for m in (mean or data_config.get("mean") or DEFAULT_MEAN))
    std = tuple(float(s) for s in (std or data_config.get("std") or DEFAULT_STD))
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return PreprocessConfig(input_size=size, resize_policy=policy, mean=mean, std=std)


class DevicePreprocessor:
    """Turns (B, H, W) or (B, H, W, 3) uint8 batches into normalized (B, 3, S, S) input."""

    def __init__(self, cfg: PreprocessConfig, device: str | torch.device = "cpu",
                 channels_last: bool = True):
        import torch

        self.cfg = cfg
        self.device = torch.device(device)
        self.channels_last = channels_last
        self._mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        x = images.to(self.device, non_blocking=True)
        if x.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {x.dtype}")
        # (B, H, W) -> (B, 1, H, W); (B, H, W, 3) -> (B, 3, H, W)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        x = x.float().div_(255.0)  # uint8 -> [0, 1] on device, before resize
        if self.cfg.resize_policy == "pad-norm":  # normalize at source size, then pad with 0
            x = (x.expand(-1, 3, -1, -1) - self._mean) / self._std
            x = resize(x, self.cfg.input_size, self.cfg.resize_policy)
        else:
            x = resize(x, self.cfg.input_size, self.cfg.resize_policy)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)  # grayscale -> 3 channels after resizing
            x = (x - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def resize(x: torch.Tensor, size: int, policy: str) -> torch.Tensor:
    """Resize (B, C, H, W) float images to (B, C, size, size) by policy."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    if policy == "native" or (h == size and w == size):
        return x
    if policy in PAD_POLICIES:
        if h > size or w > size:
            raise InvalidArgumentError(f"cannot zero-pad {h}x{w} images into a {size} px canvas.")
        top, left = (size - h) // 2, (size - w) // 2
        # zeros around the centred image (pad: before normalizing, so black; pad-norm: after)
        return F.pad(x, (left, size - w - left, top, size - h - top), value=0.0)
    if policy == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    downsampling = h > size or w > size
    return F.interpolate(x, size=(size, size), mode=policy, align_corners=False,
                         antialias=downsampling).clamp_(0.0, 1.0)
