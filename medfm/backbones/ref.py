"""A backbone as part of a run's identity (`BackboneRef`) and the weights identities every
format shares. The bottom of medfm.backbones: no torch, no timm, no other backbone module.

    BackboneRef(id="resnet18.a1_in1k", weights=PRETRAINED, ...)   # made by a format's resolve
    weights_identity("ckpt.safetensors")                           # ("file:<sha256/16>", path)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medfm.cache import file_digest
from medfm.errors import WeightsError

PRETRAINED = "pretrained"  # the timm id's published weights (offline source or hub)
RANDOM = "random"  # timm's own init under a fixed seed
REGISTRY = "registry"  # BackboneRef.format of a model named in timm's registry
RANDOM_WEIGHTS = ("random", "none")  # `weights` values that mean "no pretrained weights"
FILE_PREFIX = "file:"  # "file:<first 16 hex digits of the checkpoint's sha256>"
FILE_DIGEST_CHARS = 16
WEIGHTS_HINT = "pass --weights FILE (a local .safetensors/.pth) or --weights random"


@dataclass(frozen=True)
class BackboneRef:
    """A backbone as part of a run's identity: which network, which weights. Equal refs are the
    same model; the fields marked compare=False say how to build it, not what it is. Only a
    format's `resolve` (medfm.backbones.formats) makes one."""

    id: str  # canonical id: timm "arch.tag" ("arch" when timm has no tag), or a format's own
    weights: str  # PRETRAINED, RANDOM, "file:<sha256/16>", or a format's "sha256:<16 hex>"
    path: str | None = field(default=None, compare=False)  # the checkpoint behind "file:"
    name: str = field(default="", compare=False)  # what the user typed
    input_size: int | None = field(default=None, compare=False)  # alias input-size override
    format: str = field(default=REGISTRY, compare=False)  # the format that resolved it and
    # builds it: medfm.backbones.formats.FORMATS[format]
    folder: str | None = field(default=None, compare=False)  # where a checkpoint's files are
    source_config: dict | None = field(default=None, compare=False)  # its data config
    arch: str = field(default="", compare=False)  # architecture, e.g. "resnet18" (the id
    # before its query for a checkpoint); names throughput figures and FLOP counts
    tag: str = field(default="", compare=False)  # timm's pretrained tag ("" for a checkpoint)

    def data_config(self) -> dict:
        """The data config preprocessing resolves against (input_size (C, H, W), mean, std,
        interpolation, ...): what timm.data.resolve_model_data_config gives for the created
        model, with an alias's input-size override; a checkpoint's, read from its own files."""
        return dict(self.source_config)


def weights_identity(weights: str | None) -> tuple[str, str | None]:
    """(identity, checkpoint path) of a `weights` argument: None -> PRETRAINED, "random"/"none"
    -> RANDOM, a path -> "file:<sha256/16>" of its bytes (cached by path, size and mtime)."""
    if weights is None:
        return PRETRAINED, None
    if weights.strip().lower() in RANDOM_WEIGHTS:
        return RANDOM, None
    path = Path(weights).expanduser().resolve()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; {WEIGHTS_HINT}.")
    digest = file_digest(path, "sha256")[:FILE_DIGEST_CHARS]
    return f"{FILE_PREFIX}{digest}", str(path)
