"""Backbones published as checkpoints rather than registered in timm: the three formats models
ship in on the Hugging Face Hub, from the hub cache or a local folder, resolved to one identity
without importing torch.

    hf-hub:timm/tf_efficientnet_lite1.in1k   timm format on the Hub (config.json, model.safetensors)
    local-dir:/models/my_vit                   timm format in a local folder
    open_clip:ViT-B-32/openai                  OpenCLIP built-in model with a pretrained tag
    open_clip:hf-hub:org/name                  OpenCLIP format on the Hub (open_clip_config.json,
                                               open_clip_model.safetensors)
    open_clip:/models/biomedclip               OpenCLIP format in a local folder
    hf:org/name      hf:/models/rad-dino       Transformers format (config.json,
                                               preprocessor_config.json, model.safetensors)
    ...?features=pooled                        which pooled vector is the feature (FORMATS)

A folder is a path that starts with "/", "./", "../" or "~"; anything else after the prefix is a
hub repo id (`org/name`). Hub files come through `huggingface_hub.hf_hub_download`, so they are
read from the local hub cache (HF_HUB_CACHE) and, with HF_HUB_OFFLINE=1, never from the network.

Identity. The canonical id names the source in a form that fits a file name (`/` -> `--`, the
Hub cache's own spelling) with the feature choice always spelled out, e.g.
`hf:facebook--dinov2-small?features=cls`; the weights identity is `sha256:<16 hex>` over the
content of the files that define the model (its config and every weight file), so a new
revision of the same repo, or another folder under the same name, is another backbone.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from medfm.errors import MedfmError, UnknownBackboneError, WeightsError

SOURCE_DIGEST_CHARS = 16  # hex digits of the weights identity "sha256:<digest>"
SOURCE_DIGEST_PREFIX = "sha256:"
FEATURES_KEY = "features"  # "...?features=pooled"
LOCAL_PREFIXES = ("/", "./", "../", "~")  # what makes the text after a prefix a folder
# OpenCLIP's defaults for a preprocess_cfg that leaves them out (open_clip.constants, which cannot
# be imported without torch)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224  # a config without an image size
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # Transformers' `resample` codes


class MissingExtraError(MedfmError):
    """A backbone format whose loader (an optional dependency) is not installed."""


@dataclass(frozen=True)
class SourceFormat:
    """A checkpoint format medfm loads with that format's own code."""

    name: str  # first part of the canonical id: "timm", "open_clip", "hf"
    module: str  # the package that loads it, e.g. "transformers"
    extra: str  # medfm's extra that installs it: pip install 'medfm[<extra>]'
    config_file: str  # the file that says how to build the model
    weights_files: tuple[str, ...]  # weight files looked for, in this order
    features: tuple[str, ...] = ()  # feature choices; the first is the default
    feature_help: str = ""  # what each choice means, for error messages


FORMATS: dict[str, SourceFormat] = {f.name: f for f in (
    SourceFormat("timm", "timm", "", "config.json",
                 ("model.safetensors", "pytorch_model.bin")),
    SourceFormat("open_clip", "open_clip", "openclip", "open_clip_config.json",
                 ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                  "open_clip_pytorch_model.bin"),
                 features=("embed", "pooled"),
                 feature_help="embed: the projected image embedding; pooled: the pooled "
                              "features before the projection"),
    SourceFormat("hf", "transformers", "hf", "config.json",
                 ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json"),
                 features=("cls", "mean", "pooler"),
                 feature_help="cls: the final CLS token; mean: the mean of the patch tokens; "
                              "pooler: the model's own pooled output (SigLIP's attention pool)"),
)}
PREPROCESSOR_FILE = "preprocessor_config.json"  # Transformers' image processor config
PREFIXES = {  # what the user types -> the format it names
    "hf-hub:": "timm", "local-dir:": "timm", "open_clip:": "open_clip", "hf:": "hf",
}


@dataclass(frozen=True)
class SourceName:
    """A parsed source name: which format, where its files are, which features."""

    format: SourceFormat
    repo: str | None = None  # hub repo id "org/name"
    folder: Path | None = None  # local folder (absolute)
    builtin: tuple[str, str] | None = None  # OpenCLIP (model, pretrained tag)
    features: str = ""  # one of format.features ("" when the format has no choice)

    def canonical_id(self) -> str:
        if self.builtin:
            where = f"{self.builtin[0]}.{self.builtin[1]}"
        elif self.repo:
            where = ("hf-hub:" if self.format.name == "open_clip" else "") + self.repo.replace(
                "/", "--")
        else:
            where = re.sub(r"[^A-Za-z0-9.+-]+", "-", self.folder.name).strip("-") or "folder"
            if self.format.name == "open_clip":
                where = f"local-dir:{where}"
        prefix = {"timm": "hf-hub:" if self.repo else "local-dir:"}.get(
            self.format.name, f"{self.format.name}:")
        query = f"?{FEATURES_KEY}={self.features}" if self.features else ""
        return f"{prefix}{where}{query}"


def is_source_name(name: str) -> bool:
    return name.strip().startswith(tuple(PREFIXES))


def _bad(name: str, detail: str) -> UnknownBackboneError:
    return UnknownBackboneError(
        f"cannot read backbone name {name!r}: {detail}. Spell hub checkpoints hf-hub:org/name "
        "(timm), open_clip:MODEL/TAG or open_clip:hf-hub:org/name (OpenCLIP), hf:org/name "
        "(Transformers), or give a local folder: local-dir:/path, open_clip:/path, hf:/path.")


def _repo_id(name: str, text: str) -> str:
    org, sep, repo = text.partition("/")
    if not sep or not org or not repo or "/" in repo:
        raise _bad(name, f"{text!r} is neither a hub repo id org/name nor a folder path")
    return text


def parse_source_name(name: str) -> SourceName:
    """Parse a prefixed name (module docstring); raises UnknownBackboneError on bad syntax."""
    text = name.strip()
    prefix = next(p for p in PREFIXES if text.startswith(p))
    fmt = FORMATS[PREFIXES[prefix]]
    rest, _, query = text[len(prefix):].partition("?")
    features = fmt.features[0] if fmt.features else ""
    if query:
        key, _, value = query.partition("=")
        if key != FEATURES_KEY or not fmt.features or value not in fmt.features:
            choices = (f"{FEATURES_KEY}= one of {', '.join(fmt.features)} ({fmt.feature_help})"
                       if fmt.features else f"no options for the {fmt.name} format")
            raise _bad(name, f"unknown option {query!r}: {choices}")
        features = value
    if not rest:
        raise _bad(name, "nothing after the prefix")
    if prefix == "local-dir:" or rest.startswith(LOCAL_PREFIXES):
        return SourceName(fmt, folder=Path(rest).expanduser().resolve(), features=features)
    if prefix == "open_clip:" and rest.startswith("hf-hub:"):
        return SourceName(fmt, repo=_repo_id(name, rest[len("hf-hub:"):]), features=features)
    if prefix == "open_clip:":
        model, sep, tag = rest.partition("/")
        if not sep or not model or not tag:
            raise _bad(name, "an OpenCLIP built-in model needs its pretrained tag, MODEL/TAG "
                             "(open_clip.list_pretrained() lists them)")
        return SourceName(fmt, builtin=(model, tag), features=features)
    return SourceName(fmt, repo=_repo_id(name, rest), features=features)


def canonical_source_id(name: str) -> str:
    """The canonical id of a prefixed name, from its spelling alone (no file is read)."""
    return parse_source_name(name).canonical_id()


# -- finding the files ----------------------------------------------------------------------------

def require_extra(fmt: SourceFormat, name: str) -> None:
    """A one-line MissingExtraError when the format's loader is not importable."""
    try:
        found = importlib.util.find_spec(fmt.module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingExtraError(
            f"backbone {name!r} is in the {fmt.name} format, which needs the package "
            f"{fmt.module}: pip install 'medfm[{fmt.extra}]'.")


def _missing_hint(source: SourceName) -> str:
    if source.repo:
        return ("download it where there is network (hf download "
                f"{source.repo}), or give a local folder (see medfm's README)")
    return f"put the {source.format.name}-format files in {source.folder}"


def _hub_file(repo: str, filename: str) -> Path | None:
    """The cached (or downloaded) hub file, or None when neither the cache nor the Hub has it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError)

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    except RepositoryNotFoundError as err:
        raise WeightsError(f"the Hub has no repository {repo} (or it is private); check the "
                           "name, or log in with hf auth login.") from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise WeightsError(f"cannot read {filename} of {repo} from the Hub or its local cache "
                           f"({type(err).__name__}: {str(err).splitlines()[0]}).") from err


def _file(source: SourceName, filename: str) -> Path | None:
    if source.repo:
        return _hub_file(source.repo, filename)
    path = source.folder / filename
    return path if path.is_file() else None


def _where(source: SourceName) -> str:
    return (f"the hub repo {source.repo} (local cache or Hub)" if source.repo
            else f"the folder {source.folder}")


def config_file(source: SourceName, name: str) -> Path:
    """The format's config file, or a WeightsError saying what is missing where."""
    if source.folder is not None and not source.folder.is_dir():
        raise WeightsError(f"backbone {name!r}: {source.folder} is not a folder.")
    path = _file(source, source.format.config_file)
    if path is None:
        raise WeightsError(
            f"backbone {name!r}: {_where(source)} has no {source.format.config_file}, so it is "
            f"not a {source.format.name}-format checkpoint; {_missing_hint(source)}.")
    return path


def weight_files(source: SourceName, name: str) -> list[Path]:
    """Every weight file of the checkpoint (the shards of a sharded one), or a WeightsError."""
    for filename in source.format.weights_files:
        path = _file(source, filename)
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            return [path]
        shards = sorted(set(read_json_config(path, name).get("weight_map", {}).values()))
        found = [_file(source, shard) for shard in shards]
        if not shards or None in found:
            raise WeightsError(f"backbone {name!r}: the shards listed in {path.name} are not all "
                               f"in {_where(source)}; {_missing_hint(source)}.")
        return found
    raise WeightsError(
        f"backbone {name!r}: no weights in {_where(source)} (looked for "
        f"{', '.join(source.format.weights_files)}); {_missing_hint(source)}, or pass "
        "--weights random.")


def read_json_config(path: Path, name: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"backbone {name!r}: {path} is not readable JSON "
                           f"({type(err).__name__}).") from err
    if not isinstance(value, dict):
        raise WeightsError(f"backbone {name!r}: {path} does not hold a JSON object.")
    return value


def files_digest(paths: list[Path]) -> str:
    """`sha256:<16 hex>` over the names and content digests of `paths` (cached per file)."""
    import hashlib

    from medfm.cache import file_digest

    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path.name}|{file_digest(path, 'sha256')}\n".encode())
    return SOURCE_DIGEST_PREFIX + h.hexdigest()[:SOURCE_DIGEST_CHARS]


# -- data configs, read from each format's own files --------------------------------------------

def _square(size, name: str, where: Path) -> int:
    """A side from an int, [h, w] or {"height", "width"} / {"shortest_edge"} size."""
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise WeightsError(f"backbone {name!r}: {where} asks for a non-square input "
                               f"{list(size)}; medfm feeds square images.")
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise WeightsError(f"backbone {name!r}: {where} has no usable image size ({size!r}).")
    return size


def _data_config(side: int, mean, std, interpolation: str) -> dict:
    return {"input_size": (3, side, side), "mean": tuple(float(m) for m in mean),
            "std": tuple(float(s) for s in std), "interpolation": interpolation}


def timm_data_config(config: dict, name: str, where: Path) -> dict:
    """What timm.data.resolve_model_data_config gives for a model built from a hub config.json
    (the pretrained_cfg, with a fixed-size model's saved img_size, as timm applies it)."""
    if "architecture" not in config:
        raise WeightsError(f"backbone {name!r}: {where} names no timm 'architecture', so it is "
                           "not a timm-format config.json (for Transformers models use hf:).")
    cfg = dict(config.get("pretrained_cfg", config))
    args = config.get("model_args", {}) or {}
    size = cfg.get("input_size", (3, IMAGE_SIZE, IMAGE_SIZE))
    if args.get("img_size") is not None and cfg.get("fixed_input_size", False):
        size = (size[0], *((args["img_size"],) * 2 if isinstance(args["img_size"], int)
                           else args["img_size"]))
    side = _square(list(size[1:]), name, where)
    return _data_config(side, cfg.get("mean", (0.485, 0.456, 0.406)),
                        cfg.get("std", (0.229, 0.224, 0.225)), cfg.get("interpolation", "bicubic"))


def open_clip_data_config(config: dict, name: str, where: Path) -> dict:
    """OpenCLIP's preprocessing for an open_clip_config.json: the vision tower's image size and
    preprocess_cfg's mean/std (OpenAI's when absent)."""
    model_cfg = config.get("model_cfg")
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict):
        raise WeightsError(f"backbone {name!r}: {where} has no model_cfg.vision_cfg, so it is "
                           "not an OpenCLIP config.")
    pre = config.get("preprocess_cfg", {}) or {}
    side = _square(model_cfg["vision_cfg"].get("image_size", IMAGE_SIZE), name, where)
    return _data_config(side, pre.get("mean", OPENAI_CLIP_MEAN), pre.get("std", OPENAI_CLIP_STD),
                        pre.get("interpolation", "bicubic"))


def hf_data_config(processor: dict, name: str, where: Path) -> dict:
    """The image processor's input side (its crop when it center-crops, else its resize), mean,
    std and resampling: what AutoImageProcessor.from_pretrained reads."""
    if "image_mean" not in processor or "image_std" not in processor:
        raise WeightsError(f"backbone {name!r}: {where} has no image_mean/image_std, so it is "
                           "not an image processor config.")
    crop = processor.get("do_center_crop") and processor.get("crop_size")
    side = _square(crop or processor.get("size", IMAGE_SIZE), name, where)
    mean, std = processor["image_mean"], processor["image_std"]
    mean, std = (mean * 3, std * 3) if len(mean) == 1 else (mean, std)
    return _data_config(side, mean, std,
                        PIL_RESAMPLE.get(processor.get("resample"), "bicubic"))


def open_clip_builtin_config(model: str, tag: str, name: str, *,
                             need_weights: bool) -> tuple[dict, Path | None]:
    """(data config, cached weights file or None) of an OpenCLIP built-in model and tag: the
    tag's registry entry lives in open_clip's Python code, so this imports open_clip."""
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


@dataclass(frozen=True)
class LocatedSource:
    """A source name with its files found and its data config read."""

    name: SourceName
    folder: Path | None  # the folder the files are in (hub snapshot or local); None: built-in
    files: tuple[Path, ...]  # config + weight files (the weights identity's input)
    data_config: dict  # input_size (3, S, S), mean, std, interpolation


def locate(name: str, *, need_weights: bool) -> LocatedSource:
    """Find a source's files and read its data config; no torch import except for an OpenCLIP
    built-in (see open_clip_builtin_config)."""
    source = parse_source_name(name)
    fmt = source.format
    require_extra(fmt, name)
    if source.builtin:
        config, path = open_clip_builtin_config(*source.builtin, name, need_weights=need_weights)
        return LocatedSource(source, None, (path,) if path else (), config)
    config_path = config_file(source, name)
    config = read_json_config(config_path, name)
    files = [config_path]
    if fmt.name == "timm":
        data_config = timm_data_config(config, name, config_path)
    elif fmt.name == "open_clip":
        data_config = open_clip_data_config(config, name, config_path)
    else:
        if "model_type" not in config:
            raise WeightsError(f"backbone {name!r}: {config_path} has no model_type, so it is not "
                               "a Transformers config (a timm checkpoint loads with hf-hub: or "
                               "local-dir:).")
        processor = _file(source, PREPROCESSOR_FILE)
        if processor is None:
            raise WeightsError(f"backbone {name!r}: {_where(source)} has no {PREPROCESSOR_FILE} "
                               "(the image processor's size, mean and std); save it with "
                               "AutoImageProcessor.save_pretrained.")
        data_config = hf_data_config(read_json_config(processor, name), name, processor)
        files.append(processor)
    if need_weights:
        files += weight_files(source, name)
    return LocatedSource(source, config_path.parent, tuple(files), data_config)
