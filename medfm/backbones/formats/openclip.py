"""OpenCLIP's format: the image tower of a CLIP model, built by open_clip.create_model.

    open_clip:ViT-B-32/openai        a built-in model with a pretrained tag (open_clip's registry)
    open_clip:hf-hub:org/name        on the Hub (open_clip_config.json, open_clip_model.safetensors)
    open_clip:/models/biomedclip     in a local folder
    ...?features=pooled              the pooled features before the projection (default: embed,
                                     the projected image embedding)

The data config is the tower's image size and the config's preprocess_cfg mean/std (OpenAI's
when absent). Needs the `openclip` extra.
"""

from __future__ import annotations

from pathlib import Path

from medfm.backbones.formats.base import Built
from medfm.backbones.hub import (IMAGE_SIZE, CheckpointFormat, LocatedSource, SourceName,
                                 bad_name, data_config, repo_id, safe_folder_name, square_side)
from medfm.backbones.ref import RANDOM, BackboneRef
from medfm.errors import InvalidArgumentError, UnknownBackboneError, WeightsError

# OpenCLIP's defaults for a preprocess_cfg that leaves them out (open_clip.constants, which cannot
# be imported without torch)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HUB_PREFIX = "hf-hub:"  # open_clip:hf-hub:org/name
WHY_CHARS = 200  # of open_clip's own error message quoted in a WeightsError


def open_clip_data_config(config: dict, name: str, where: Path) -> dict:
    """OpenCLIP's preprocessing for an open_clip_config.json: the vision tower's image size and
    preprocess_cfg's mean/std (OpenAI's when absent)."""
    model_cfg = config.get("model_cfg")
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict):
        raise WeightsError(f"backbone {name!r}: {where} has no model_cfg.vision_cfg, so it is "
                           "not an OpenCLIP config.")
    pre = config.get("preprocess_cfg", {}) or {}
    side = square_side(model_cfg["vision_cfg"].get("image_size", IMAGE_SIZE), name, where)
    return data_config(side, pre.get("mean", OPENAI_CLIP_MEAN), pre.get("std", OPENAI_CLIP_STD),
                       pre.get("interpolation", "bicubic"))


def open_clip_builtin_config(model: str, tag: str, name: str, *,
                             need_weights: bool) -> tuple[dict, Path | None]:
    """(data config, cached weights file or None) of an OpenCLIP built-in model and tag: the
    tag's registry entry lives in open_clip's Python code, so this imports open_clip."""
    # open_clip (an optional extra, imports torch) loads only for a built-in model's name
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise UnknownBackboneError(f"backbone {name!r}: OpenCLIP has no model {model!r} "
                                   "(open_clip.list_models() lists them).")
    tagged = get_pretrained_cfg(model, tag)
    if not tagged:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise UnknownBackboneError(f"backbone {name!r}: OpenCLIP has no pretrained tag {tag!r} "
                                   f"for {model} (tags: {tags}).")
    config = open_clip_data_config({"model_cfg": cfg, "preprocess_cfg": tagged}, name,
                                   Path(f"open_clip:{model}"))
    if not need_weights:
        return config, None
    try:
        path = Path(download_pretrained(tagged))
    except Exception as err:  # noqa: BLE001 - open_clip raises bare RuntimeError/OSError/HTTP
        raise WeightsError(
            f"backbone {name!r}: OpenCLIP's weights for {model}/{tag} are neither in the local "
            f"hub cache nor downloadable ({type(err).__name__}); download them where there is "
            "network, or give a local folder.") from err
    return config, path


class OpenClipFormat(CheckpointFormat):
    """open_clip:MODEL/TAG, open_clip:hf-hub:org/name and open_clip:/path."""

    def parse_location(self, name: str, rest: str, features: str) -> SourceName:
        if rest.startswith(HUB_PREFIX):
            return SourceName(self, repo=repo_id(name, rest[len(HUB_PREFIX):]),
                              features=features)
        model, sep, tag = rest.partition("/")
        if not sep or not model or not tag:
            raise bad_name(name, "an OpenCLIP built-in model needs its pretrained tag, "
                                 "MODEL/TAG (open_clip.list_pretrained() lists them)")
        return SourceName(self, builtin=(model, tag), features=features)

    def where(self, source: SourceName) -> str:
        if source.builtin:
            return f"{source.builtin[0]}.{source.builtin[1]}"
        if source.repo:
            return HUB_PREFIX + source.repo.replace("/", "--")
        return f"local-dir:{safe_folder_name(source.folder)}"

    def read_data_config(self, source: SourceName, config: dict, config_path: Path,
                         name: str) -> tuple[dict, list[Path]]:
        return open_clip_data_config(config, name, config_path), []

    def locate(self, name: str, *, need_weights: bool) -> LocatedSource:
        source = self.parse(name)
        if not source.builtin:
            return super().locate(name, need_weights=need_weights)
        self.require_extra(name)
        config, path = open_clip_builtin_config(*source.builtin, name, need_weights=need_weights)
        return LocatedSource(source, None, (path,) if path else (), config)

    def build(self, ref: BackboneRef, *, num_classes: int, in_chans: int, init_seed: int,
              **timm_kwargs) -> Built:
        # open_clip and torch (an optional extra; seconds to import) load only to build a model
        import open_clip
        import torch
        from torch import nn

        # the encoders module imports torch: loaded only to build a model
        from medfm.backbones.encoders import OpenClipImageTower, feature_width

        if in_chans != 3 or timm_kwargs:
            raise InvalidArgumentError(f"{ref.name!r} takes 3-channel input and no timm options.")
        source = self.parse(ref.name)
        pretrained = ref.weights != RANDOM
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            try:
                if source.builtin:
                    model, tag = source.builtin
                    clip = open_clip.create_model(model, pretrained=tag if pretrained else None)
                else:
                    clip = open_clip.create_model(f"local-dir:{ref.folder}",
                                                  load_weights=pretrained)
            except Exception as err:  # noqa: BLE001 - open_clip raises RuntimeError/ValueError/..
                raise WeightsError(f"OpenCLIP cannot build {ref.name!r} from its files "
                                   f"({type(err).__name__}: "
                                   f"{str(err).splitlines()[0][:WHY_CHARS]}).") from err
            visual = clip.visual
            if source.features == "pooled":
                if isinstance(visual, open_clip.transformer.VisionTransformer):
                    visual.proj = None  # the tower then returns its pooled features
                elif isinstance(getattr(visual, "head", None), nn.Module) and hasattr(
                        visual, "trunk"):
                    visual.head = nn.Identity()  # timm trunk + projection head (BiomedCLIP)
                else:
                    raise WeightsError(f"{ref.name!r}: this OpenCLIP tower "
                                       f"({type(visual).__name__}) has no separate projection; "
                                       "use ?features=embed.")
            side = ref.data_config()["input_size"][-1]
            model = OpenClipImageTower(visual, features=source.features, num_classes=num_classes,
                                       num_features=feature_width(side, visual))
        return Built(model, self.source_label(ref, source), ref.data_config())


FORMAT = OpenClipFormat(
    name="open_clip", prefixes=("open_clip:",), module="open_clip", extra="openclip",
    config_file="open_clip_config.json",
    weights_files=("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                   "open_clip_pytorch_model.bin"),
    features=("embed", "pooled"),
    feature_help="embed: the projected image embedding; pooled: the pooled features before the "
                 "projection")
