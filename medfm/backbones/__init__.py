"""Backbones: names resolved to one identity (`names`, light), models created from it (`create`,
imports torch and timm), weights shipped in Python packages (`sources`), checkpoints from the hub
or a local folder in timm, OpenCLIP and Transformers formats (`hub`, light), and the wrapper that
gives OpenCLIP and Transformers encoders timm's feature API (`encoders`).

    from medfm.backbones import resolve_backbone, create_backbone
    ref = resolve_backbone("dinov2_vitb14", weights="random")   # no torch, no timm import
    bb = create_backbone(ref)                                   # the model, its data config
    bb = create_backbone("hf:facebook/dinov2-small?features=mean")   # any format (hub.py)
    f = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)  # (B, bb.feature_dim)
"""

from medfm.backbones.names import (
    ALIASES,
    PRETRAINED,
    RANDOM,
    BackboneAlias,
    BackboneRef,
    canonical_backbone_id,
    list_backbones,
    resolve_backbone,
    resolve_name,
)
from medfm.backbones.sources import OFFLINE_WEIGHTS, OfflineWeightSource

_CREATE = ("Backbone", "CREATION_SEED", "create_backbone", "read_checkpoint", "state_dict_digest")


def __getattr__(name: str):
    """Model creation imports torch and timm, so it loads on first use, not with the package."""
    if name in _CREATE:
        from medfm.backbones import create

        return getattr(create, name)
    raise AttributeError(f"module 'medfm.backbones' has no attribute {name!r}")


__all__ = [
    "ALIASES", "OFFLINE_WEIGHTS", "PRETRAINED", "RANDOM", "BackboneAlias", "BackboneRef",
    "OfflineWeightSource", "canonical_backbone_id", "list_backbones", "resolve_backbone",
    "resolve_name", *_CREATE,
]
