"""Backbone names -> one canonical identity, resolved by the name's format without importing timm
or torch.

    from medfm.backbones.names import resolve_backbone
    ref = resolve_backbone("resnet18")                  # alias
    ref == resolve_backbone("resnet18.a1_in1k") == resolve_backbone("resnet18")   # True
    ref.id, ref.weights, ref.data_config()              # "resnet18.a1_in1k", "pretrained", {...}
    resolve_backbone("hf:facebook/dinov2-small")        # a prefixed name: its format's identity

Every spelling of a backbone resolves to one `BackboneRef`: for a timm registry name (a medfm
alias, a bare timm architecture, the architecture with its pretrained tag) the canonical timm
id `arch.tag` (the architecture's default tag when none is given; the bare architecture when
timm has no weights for it) and which weights: `pretrained`, `random` (timm's init under a fixed
seed), or `file:<sha256>` for a local checkpoint, identified by its content; for a checkpoint
named with a format prefix, that format's id and `sha256:` of its files. Which format a name is
in, and everything about it, lives in medfm.backbones.formats (one module per format).
"""

from __future__ import annotations

from medfm.backbones.formats import format_for
from medfm.backbones.formats.timm_names import (ALIASES, FORMAT as TIMM_NAMES, BackboneAlias,
                                                list_backbones, timm_snapshot)
from medfm.backbones.formats.timm_names import resolve_name as _resolve_timm_name
from medfm.backbones.ref import (FILE_DIGEST_CHARS, FILE_PREFIX, PRETRAINED, RANDOM,
                                 RANDOM_WEIGHTS, REGISTRY, BackboneRef)
from medfm.errors import UnknownBackboneError


def resolve_name(name: str) -> tuple[str, str, BackboneAlias | None]:
    """Map a timm registry name to (timm architecture, pretrained tag, alias or None).

    An alias resolves to its timm id. A timm name without a tag gets the architecture's default
    pretrained tag ("" if timm has no weights for it); a tag must be one timm knows.
    """
    if format_for(name) is not TIMM_NAMES:
        raise UnknownBackboneError(f"{name.strip()!r} names a checkpoint, not a timm registry "
                                   "model; resolve it with resolve_backbone.")
    return _resolve_timm_name(name)


def resolve_backbone(name: str, weights: str | None = None) -> BackboneRef:
    """The canonical identity of backbone `name` with `weights` (see the module docstring)."""
    return format_for(name).resolve(name, weights)


def canonical_backbone_id(name: str) -> str:
    """The canonical id for any spelling (a filter value; reads no checkpoint); a name that
    resolves to nothing is returned as given, so rows of models this timm no longer has stay
    reachable."""
    try:
        return format_for(name).canonical_id(name)
    except UnknownBackboneError:
        return name.strip()


__all__ = ["ALIASES", "FILE_DIGEST_CHARS", "FILE_PREFIX", "PRETRAINED", "RANDOM",
           "RANDOM_WEIGHTS", "REGISTRY", "BackboneAlias", "BackboneRef", "canonical_backbone_id",
           "list_backbones", "resolve_backbone", "resolve_name", "timm_snapshot"]
