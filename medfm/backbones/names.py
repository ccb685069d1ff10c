"""Backbone names -> one canonical identity, resolved without importing timm or torch.

    from medfm.backbones.names import resolve_backbone
    ref = resolve_backbone("resnet18")                  # alias
    ref == resolve_backbone("resnet18.a1_in1k") == resolve_backbone("resnet18")   # True
    ref.id, ref.weights, ref.data_config()              # "resnet18.a1_in1k", "pretrained", {...}

Every spelling of a backbone (a medfm alias, a bare timm architecture, the architecture with its
pretrained tag) resolves to one `BackboneRef`: the canonical timm id `arch.tag` (the
architecture's default tag when none is given; the bare architecture when timm has no weights
for it) and which weights: `pretrained`, `random` (timm's init under a fixed seed), or
`file:<sha256>` for a local checkpoint, identified by its content. Resolution reads a snapshot
of timm's model registry (architectures, their tags and default tags, each id's data config)
taken once per timm version into medfm's cache, so naming a backbone costs milliseconds where
importing timm costs seconds; a name missing from the snapshot (a model registered at run time)
is looked up in timm itself.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from medfm.backbones import hub
from medfm.backbones.sources import OFFLINE_WEIGHTS, WEIGHTS_HINT
from medfm.cache import cache_dir, read_json, write_atomic
from medfm.errors import UnknownBackboneError, WeightsError

PRETRAINED = "pretrained"  # the timm id's published weights (offline source or hub)
RANDOM = "random"  # timm's own init under a fixed seed
REGISTRY = "registry"  # BackboneRef.format of a model named in timm's registry
RANDOM_WEIGHTS = ("random", "none")  # `weights` values that mean "no pretrained weights"
FILE_PREFIX = "file:"  # "file:<first 16 hex digits of the checkpoint's sha256>"
FILE_DIGEST_CHARS = 16
CLOSE_MATCHES = 5  # suggestions in an UnknownBackboneError
SNAPSHOT_FORMAT = 2  # bumped when the snapshot's content changes
DEFAULT_DATA_CONFIG = {  # timm's defaults for a model without a pretrained config
    "input_size": (3, 224, 224), "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875, "crop_mode": "center",
}


@dataclass(frozen=True)
class BackboneAlias:
    """A friendly name for a timm model with a pretrained tag."""

    name: str  # alias the user types, e.g. "dinov2_vitb14"
    timm_id: str  # full timm id with tag, e.g. "vit_base_patch14_dinov2.lvd142m"
    input_size: int | None = None  # override of the pretrained input size (DINOv2: 518)


def _aliases(*entries: BackboneAlias) -> dict[str, BackboneAlias]:
    return {a.name: a for a in entries}


# The seed paper's zoo (Wu & Papiez 2025). Names that are also timm architectures map to that
# architecture's default tag, so an alias never changes what a timm name means.
ALIASES: dict[str, BackboneAlias] = _aliases(
    BackboneAlias("vgg16", "vgg16.tv_in1k"),
    BackboneAlias("resnet18", "resnet18.a1_in1k"),
    BackboneAlias("densenet121", "densenet121.ra_in1k"),
    BackboneAlias("efficientnet_b4", "efficientnet_b4.ra2_in1k"),
    BackboneAlias("inception_v3", "inception_v3.tv_in1k"),
    BackboneAlias("inception_resnet_v2", "inception_resnet_v2.tf_in1k"),
    BackboneAlias("vit_b16", "vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    BackboneAlias("clip_vitb16_laion2b", "vit_base_patch16_clip_224.laion2b_ft_in12k_in1k"),
    BackboneAlias("clip_vitb16_openai_ft", "vit_base_patch16_clip_224.openai_ft_in12k_in1k"),
    BackboneAlias("clip_vitb16_openai", "vit_base_patch16_clip_224.openai"),
    BackboneAlias("eva02_vitb14", "eva02_base_patch14_224.mim_in22k"),
    BackboneAlias("dino_vitb16", "vit_base_patch16_224.dino"),
    BackboneAlias("dino_vits16", "vit_small_patch16_224.dino"),
    BackboneAlias("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m", input_size=518),
    BackboneAlias("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", input_size=518),
    BackboneAlias("sam_vitb16", "samvit_base_patch16.sa1b"),
    BackboneAlias("sam_in1k_vitb16", "vit_base_patch16_224.sam_in1k"),
)


@dataclass(frozen=True)
class BackboneRef:
    """A backbone as part of a run's identity: which network, which weights. Equal refs are the
    same model; the fields marked compare=False say how to build it, not what it is."""

    id: str  # canonical timm id: "arch.tag", or "arch" when timm has no pretrained tag for it
    weights: str  # PRETRAINED, RANDOM, or "file:<sha256/16>"
    path: str | None = field(default=None, compare=False)  # the checkpoint behind "file:"
    name: str = field(default="", compare=False)  # what the user typed
    input_size: int | None = field(default=None, compare=False)  # alias input-size override
    format: str = field(default="registry", compare=False)  # "registry" (timm's), else a
    # checkpoint format of medfm.backbones.hub.FORMATS: "timm", "open_clip", "hf"
    folder: str | None = field(default=None, compare=False)  # where a checkpoint's files are
    source_config: dict | None = field(default=None, compare=False)  # its data config

    @property
    def arch(self) -> str:
        return self.id.partition(".")[0] if self.format == REGISTRY else self.id.partition("?")[0]

    @property
    def tag(self) -> str:
        return self.id.partition(".")[2] if self.format == REGISTRY else ""

    def data_config(self) -> dict:
        """timm's data config for this id (input_size (C, H, W), mean, std, ...), with the alias
        override: what `timm.data.resolve_model_data_config` gives for the created model; for a
        checkpoint, the one read from its own files (medfm.backbones.hub)."""
        if self.format != REGISTRY:
            return dict(self.source_config)
        config = dict(_snapshot_config(self.id))
        if self.input_size is not None:
            config["input_size"] = (config["input_size"][0], self.input_size, self.input_size)
        return config


# -- the timm registry snapshot -----------------------------------------------------------------

_SNAPSHOT: dict | None = None


@functools.cache
def _timm_version() -> str:
    """The installed timm's version (read once per process: parsing package metadata costs
    milliseconds, and every name resolution asks)."""
    return metadata.version("timm")


def _build_snapshot() -> dict:
    """Architectures (default tag, tags) and each id's data config, read from timm itself."""
    import timm
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg, split_model_name_tag

    def config(cfg) -> dict:
        resolved = resolve_data_config(pretrained_cfg=cfg.to_dict()) if cfg else DEFAULT_DATA_CONFIG
        return {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}

    archs, configs = {}, {}
    for arch in timm.list_models():
        cfg = get_pretrained_cfg(arch)
        archs[arch] = {"default": (cfg.tag or "") if cfg else "", "tags": []}
        configs[arch] = config(cfg)
    for timm_id in timm.list_pretrained():
        arch, tag = split_model_name_tag(timm_id)
        if arch in archs:
            archs[arch]["tags"].append(tag)
            configs[timm_id] = config(get_pretrained_cfg(timm_id))
    for arch, entry in archs.items():  # a default tag with no published weights ("untrained")
        if entry["default"] and entry["default"] not in entry["tags"]:
            entry["tags"].append(entry["default"])
            configs[f"{arch}.{entry['default']}"] = configs[arch]
    return {"timm": timm.__version__, "format": SNAPSHOT_FORMAT, "archs": archs,
            "configs": configs}


def timm_snapshot() -> dict:
    """The registry snapshot for the installed timm (built and cached on first use)."""
    global _SNAPSHOT
    version = _timm_version()
    if _SNAPSHOT is None or _SNAPSHOT["timm"] != version:
        path = cache_dir("timm") / f"registry-{version}-{SNAPSHOT_FORMAT}.json"
        snapshot = read_json(path)
        if not isinstance(snapshot, dict) or snapshot.get("timm") != version or snapshot.get(
                "format") != SNAPSHOT_FORMAT:
            snapshot = _build_snapshot()
            write_atomic(path, _dumps(snapshot))
        _SNAPSHOT = snapshot
    return _SNAPSHOT


def _dumps(value) -> str:
    import json

    return json.dumps(value, separators=(",", ":"))


def _live_arch(arch: str) -> dict | None:
    """An architecture timm knows but the snapshot does not (registered at run time)."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(arch):
        return None
    cfg = get_pretrained_cfg(arch)
    tags = [p.partition(".")[2] for p in timm.list_pretrained(f"{arch}.*")]
    return {"default": (cfg.tag or "") if cfg else "", "tags": tags}


def _snapshot_config(timm_id: str) -> dict:
    config = timm_snapshot()["configs"].get(timm_id)
    if config is None:  # a run-time registration: ask timm
        from timm.data import resolve_data_config
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(timm_id)
        config = resolve_data_config(pretrained_cfg=cfg.to_dict()) if cfg else DEFAULT_DATA_CONFIG
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


# -- resolution ----------------------------------------------------------------------------------

def _unknown(name: str, detail: str, candidates) -> UnknownBackboneError:
    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=CLOSE_MATCHES,
                                      cutoff=0.6)  # each name once: an alias is also an arch
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownBackboneError(
        f"unknown backbone {name!r}: {detail}.{hint} "
        "List names with medfm.backbones.list_backbones(pattern)."
    )


def resolve_name(name: str) -> tuple[str, str, BackboneAlias | None]:
    """Map a user's name to (timm architecture, pretrained tag, alias or None).

    An alias resolves to its timm id. A timm name without a tag gets the architecture's default
    pretrained tag ("" if timm has no weights for it); a tag must be one timm knows.
    """
    name = name.strip()
    if hub.is_source_name(name):
        raise UnknownBackboneError(f"{name!r} names a checkpoint, not a timm registry model; "
                                   "resolve it with resolve_backbone.")
    alias = ALIASES.get(name)
    arch, _, tag = (alias.timm_id if alias else name).partition(".")
    snapshot = timm_snapshot()
    entry = snapshot["archs"].get(arch) or _live_arch(arch)
    if entry is None:
        known = [*ALIASES, *snapshot["archs"], *snapshot["configs"]]
        if "/" in name:  # a hub repo id or a folder without its format prefix
            raise UnknownBackboneError(
                f"unknown backbone {name!r}: a hub repo or folder needs its format: "
                f"hf-hub:{name} (timm), open_clip:hf-hub:{name} (OpenCLIP) or hf:{name} "
                "(Transformers); folders: local-dir:/path, open_clip:/path, hf:/path.")
        raise _unknown(name, "neither a medfm alias nor a timm model", known)
    if tag and tag not in entry["tags"]:
        raise _unknown(name, f"timm has no pretrained tag {tag!r} for {arch}",
                       [f"{arch}.{t}" for t in entry["tags"]])
    return arch, tag or entry["default"], alias


def weights_identity(weights: str | None, timm_id: str) -> tuple[str, str | None]:
    """(identity, checkpoint path) of a `weights` argument: None -> PRETRAINED, "random"/"none"
    -> RANDOM, a path -> "file:<sha256/16>" of its bytes (cached by path, size and mtime)."""
    from medfm.cache import file_digest

    if weights is None:
        if "." not in timm_id and timm_id not in OFFLINE_WEIGHTS:
            raise WeightsError(f"timm has no pretrained weights for {timm_id}; {WEIGHTS_HINT}.")
        return PRETRAINED, None
    if weights.strip().lower() in RANDOM_WEIGHTS:
        return RANDOM, None
    path = Path(weights).expanduser().resolve()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; {WEIGHTS_HINT}.")
    digest = file_digest(path, "sha256")[:FILE_DIGEST_CHARS]
    return f"{FILE_PREFIX}{digest}", str(path)


def resolve_checkpoint(name: str, weights: str | None = None) -> BackboneRef:
    """The identity of a hub or local-folder checkpoint (medfm.backbones.hub): its canonical id
    and weights identity: `sha256:` of its files, RANDOM, or a timm-format model's weights file
    ("file:" digest)."""
    located = hub.locate(name, need_weights=weights is None)
    if weights is None:
        identity, path = hub.files_digest(list(located.files)), None
    else:
        identity, path = weights_identity(weights, "")
        if path is not None and located.name.format.name != "timm":
            raise WeightsError(
                f"--weights FILE loads into timm-format models only; for {name!r} put the "
                "weights in a folder in its format's own layout and name that folder.")
    return BackboneRef(id=located.name.canonical_id(), weights=identity, path=path,
                       name=name.strip(), format=located.name.format.name,
                       folder=str(located.folder) if located.folder else None,
                       source_config=located.data_config)


def resolve_backbone(name: str, weights: str | None = None) -> BackboneRef:
    """The canonical identity of backbone `name` with `weights` (see the module docstring)."""
    if hub.is_source_name(name):
        return resolve_checkpoint(name, weights)
    arch, tag, alias = resolve_name(name)
    timm_id = f"{arch}.{tag}" if tag else arch
    identity, path = weights_identity(weights, timm_id)
    return BackboneRef(id=timm_id, weights=identity, path=path, name=name.strip(),
                       input_size=alias.input_size if alias else None)


def canonical_backbone_id(name: str) -> str:
    """The canonical timm id for any spelling (a filter value); a name that resolves to nothing
    is returned as given, so rows of models this timm no longer has stay reachable."""
    try:
        if hub.is_source_name(name):
            return hub.canonical_source_id(name)
        arch, tag, _ = resolve_name(name)
    except UnknownBackboneError:
        return name.strip()
    return f"{arch}.{tag}" if tag else arch


def list_backbones(pattern: str = "*") -> list[str]:
    """Names `create_backbone` accepts that match a shell-style pattern: aliases, then timm ids.

    timm ids are listed with their pretrained tags (`arch.tag`), as timm.list_pretrained gives.
    """
    aliases = sorted(a for a in ALIASES if fnmatch.fnmatchcase(a, pattern))
    ids = [i for i in timm_snapshot()["configs"] if "." in i and fnmatch.fnmatchcase(i, pattern)]
    return aliases + sorted(ids)

