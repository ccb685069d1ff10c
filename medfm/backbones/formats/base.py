"""The protocol every backbone format implements, and what building one returns.

A format turns what the user typed into a `BackboneRef` (its identity: canonical id, weights
identity, the checkpoint files behind it and their digest, the data config) without importing
torch, and later builds the model for that ref with timm's feature API
(`forward_head(forward_features(x), pre_logits=True)`), importing what it needs then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from medfm.backbones.ref import BackboneRef

if TYPE_CHECKING:  # annotations only: torch loads when a model is built, not with the format
    import torch


@dataclass
class Built:
    """A model a format built for a ref, before medfm.backbones.create finishes it (eval mode,
    weights digest, feature width)."""

    model: torch.nn.Module  # timm's feature API, on CPU; a head of num_classes (0: Identity)
    source: str  # where the weights came from: "offline:<package>", "hub", "file:<path>",
    # "random", or "<format>:<folder or hub repo>" (recorded in stores and rows, not keyed)
    data_config: dict  # input_size (C, H, W), mean, std, interpolation, ... of the built model


@runtime_checkable
class BackboneFormat(Protocol):
    """One way to name and build a backbone (medfm.backbones.formats has one module each)."""

    name: str  # BackboneRef.format of the refs it makes, e.g. "registry", "timm", "hf"
    prefixes: tuple[str, ...]  # what names it claims start with ("hf:"); () for the fallback
    # (timm registry names), which takes every name no other format claims

    def parse(self, name: str) -> Any:
        """The name's parts (format-specific), or an UnknownBackboneError saying how to spell
        it. Reads no file."""

    def canonical_id(self, name: str) -> str:
        """The canonical id of `name` from its spelling alone (a filter value; reads no
        checkpoint): every spelling of one model gives one id."""

    def resolve(self, name: str, weights: str | None) -> BackboneRef:
        """The identity of `name` with `weights` (None: its own pretrained weights; "random";
        a file): checkpoint files found and digested, data config read. No torch import."""

    def build(self, ref: BackboneRef, *, num_classes: int, in_chans: int, init_seed: int,
              **timm_kwargs) -> Built:
        """The model for a ref this format resolved, every fresh weight seeded by `init_seed`
        (the caller's RNG state restored); one-line MedfmErrors for weights that do not load."""
