"""Backbones: names resolved to one identity (`names`, light) by the name's format (`formats/`,
one module per format: timm registry names, hf-hub:/local-dir:, open_clip:, hf:), models created
from it (`create`, imports torch and timm). Below them: `ref` (BackboneRef, weights identities),
`offline` (weights shipped in Python packages), `hub` (what the checkpoint formats share: files
on the Hub or in a folder, their digest), `checkpoints` (reading and loading weight files) and
`encoders` (OpenCLIP and Transformers encoders behind timm's feature API).

To add a backbone format, add a module to medfm/backbones/formats/ (see its docstring); to add
weights shipped in a Python package for a timm model, add an entry to `offline.OFFLINE_WEIGHTS`.

    from medfm.backbones import resolve_backbone, create_backbone
    ref = resolve_backbone("dinov2_vitb14", weights="random")   # no torch, no timm import
    bb = create_backbone(ref)                                   # the model, its data config
    bb = create_backbone("hf:facebook/dinov2-small?features=mean")   # any format (hub.py)
    f = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)  # (B, bb.feature_dim)
"""

import importlib

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
from medfm.backbones.offline import OFFLINE_WEIGHTS, OfflineWeightSource

_CREATE = {"Backbone": "create", "create_backbone": "create", "CREATION_SEED": "checkpoints",
           "read_checkpoint": "checkpoints", "state_dict_digest": "checkpoints"}


def __getattr__(name: str):
    """Model creation imports torch and timm, so it loads on first use, not with the package."""
    if name in _CREATE:
        # the module named in _CREATE imports torch and timm: loaded only when asked for
        return getattr(importlib.import_module(f"medfm.backbones.{_CREATE[name]}"), name)
    raise AttributeError(f"module 'medfm.backbones' has no attribute {name!r}")


__all__ = [
    "ALIASES", "OFFLINE_WEIGHTS", "PRETRAINED", "RANDOM", "BackboneAlias", "BackboneRef",
    "OfflineWeightSource", "canonical_backbone_id", "list_backbones", "resolve_backbone",
    "resolve_name", *_CREATE,
]
