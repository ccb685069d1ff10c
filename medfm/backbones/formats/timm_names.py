"""timm registry names: a medfm alias, a bare timm architecture (its default pretrained tag) or
`arch.tag`, resolved to the canonical timm id `arch.tag` without importing timm or torch; built
by timm.create_model with weights from an offline source (medfm.backbones.offline), timm's hub
download, a checkpoint file or timm's own init under a fixed seed. The fallback format: it takes
every name no prefixed format claims.

    FORMAT.resolve("resnet18", None).id          # "resnet18.a1_in1k" (alias)
    FORMAT.resolve("test_resnet", "random")       # timm's init under CREATION_SEED

Resolution reads a snapshot of timm's model registry (architectures, their tags and default
tags, each id's data config) taken once per timm version into medfm's cache, so naming a
backbone costs milliseconds where importing timm costs seconds; a name missing from the snapshot
(a model registered at run time) is looked up in timm itself.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from medfm.backbones.formats.base import Built
from medfm.backbones.offline import OFFLINE_WEIGHTS
from medfm.backbones.ref import (PRETRAINED, RANDOM, REGISTRY, WEIGHTS_HINT, BackboneRef,
                                 weights_identity)
from medfm.cache import cache_dir, read_json, write_atomic
from medfm.errors import UnknownBackboneError, WeightsError

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


# -- the timm registry snapshot -----------------------------------------------------------------

_SNAPSHOT: dict | None = None


@functools.cache
def _timm_version() -> str:
    """The installed timm's version (read once per process: parsing package metadata costs
    milliseconds, and every name resolution asks)."""
    return metadata.version("timm")


def _build_snapshot() -> dict:
    """Architectures (default tag, tags) and each id's data config, read from timm itself."""
    # timm (seconds to import) loads only when the snapshot is (re)built, once per timm version
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
    return json.dumps(value, separators=(",", ":"))


def _live_arch(arch: str) -> dict | None:
    """An architecture timm knows but the snapshot does not (registered at run time)."""
    # timm loads only for a name the snapshot does not hold
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(arch):
        return None
    cfg = get_pretrained_cfg(arch)
    tags = [p.partition(".")[2] for p in timm.list_pretrained(f"{arch}.*")]
    return {"default": (cfg.tag or "") if cfg else "", "tags": tags}


def _snapshot_config(timm_id: str) -> dict:
    config = timm_snapshot()["configs"].get(timm_id)
    if config is None:  # a run-time registration: ask timm (loaded only then)
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


def list_backbones(pattern: str = "*") -> list[str]:
    """Names `create_backbone` accepts that match a shell-style pattern: aliases, then timm ids.

    timm ids are listed with their pretrained tags (`arch.tag`), as timm.list_pretrained gives.
    """
    aliases = sorted(a for a in ALIASES if fnmatch.fnmatchcase(a, pattern))
    ids = [i for i in timm_snapshot()["configs"] if "." in i and fnmatch.fnmatchcase(i, pattern)]
    return aliases + sorted(ids)


def _pretrained_available(timm_id: str) -> None:
    """A WeightsError when neither timm nor an offline source has weights for `timm_id`."""
    if "." not in timm_id and timm_id not in OFFLINE_WEIGHTS:
        raise WeightsError(f"timm has no pretrained weights for {timm_id}; {WEIGHTS_HINT}.")


class TimmNames:
    """The timm registry (and medfm's aliases): the format of every name without a prefix."""

    name = REGISTRY
    prefixes: tuple[str, ...] = ()

    def parse(self, name: str) -> tuple[str, str, BackboneAlias | None]:
        return resolve_name(name)

    def canonical_id(self, name: str) -> str:
        arch, tag, _ = resolve_name(name)
        return f"{arch}.{tag}" if tag else arch

    def resolve(self, name: str, weights: str | None) -> BackboneRef:
        arch, tag, alias = resolve_name(name)
        timm_id = f"{arch}.{tag}" if tag else arch
        if weights is None:
            _pretrained_available(timm_id)
        identity, path = weights_identity(weights)
        input_size = alias.input_size if alias else None
        config = dict(_snapshot_config(timm_id))
        if input_size is not None:
            config["input_size"] = (config["input_size"][0], input_size, input_size)
        return BackboneRef(id=timm_id, weights=identity, path=path, name=name.strip(),
                           input_size=input_size, source_config=config, arch=arch, tag=tag)

    def build(self, ref: BackboneRef, *, num_classes: int, in_chans: int, init_seed: int,
              **timm_kwargs) -> Built:
        """PRETRAINED -> the offline source registered for the timm id, else timm's hub;
        RANDOM -> timm's init under a fixed seed; "file:" -> the checkpoint, loaded strictly."""
        # torch and timm (seconds to import) load only when a model is built
        from timm.data import resolve_model_data_config

        # the checkpoints module imports torch and timm: loaded only to build a model
        from medfm.backbones.checkpoints import load_strict, read_checkpoint, seeded_create

        kwargs = dict(num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
        seeded = dict(pretrained=False, init_seed=init_seed)
        if ref.weights == PRETRAINED and ref.id in OFFLINE_WEIGHTS:
            source = OFFLINE_WEIGHTS[ref.id]
            model = seeded_create(ref.id, **seeded, **kwargs)
            load_strict(model, source.load_state_dict(), origin=f"offline source {source.name}")
            label = f"offline:{source.name}"
        elif ref.weights == PRETRAINED:
            model = _create_from_hub(ref.id, **kwargs)  # seeded by CREATION_SEED, as always
            label = "hub"
        elif ref.weights == RANDOM:
            model = seeded_create(ref.id, **seeded, **kwargs)
            label = "random"
        else:
            model = seeded_create(ref.id, **seeded, **kwargs)
            load_strict(model, read_checkpoint(Path(ref.path)), origin=f"file {ref.path}")
            label = f"file:{Path(ref.path)}"
        return Built(model, label, resolve_model_data_config(model))


def _create_from_hub(timm_id: str, **kwargs):
    from medfm.backbones.checkpoints import seeded_create  # imports torch: only to build

    if "." not in timm_id:
        raise WeightsError(f"timm has no pretrained weights for {timm_id}; {WEIGHTS_HINT}.")
    try:
        return seeded_create(timm_id, pretrained=True, **kwargs)
    except OSError as err:  # hub/URL download failures (no network, no cache) are OSErrors
        raise WeightsError(
            f"cannot download pretrained weights for {timm_id} from the hub "
            f"({type(err).__name__}); {WEIGHTS_HINT}."
        ) from err


FORMAT = TimmNames()
