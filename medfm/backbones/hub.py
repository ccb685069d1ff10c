"""What the checkpoint formats share (medfm.backbones.formats: timm_hub, openclip, hf):
backbones published as files rather than registered in timm, on the Hugging Face Hub (read from
the hub cache) or in a local folder, resolved to one identity without importing torch.
`CheckpointFormat` parses a prefixed name, finds the config and weight files, digests them and
reads the data config; each format module says which files, how its id is spelled, how its data
config is read from them, and how its model is built.

    hf-hub:timm/tf_efficientnet_lite1.in1k   timm format on the Hub (config.json, model.safetensors)
    local-dir:/models/my_vit                   timm format in a local folder
    open_clip:ViT-B-32/openai                  OpenCLIP built-in model with a pretrained tag
    open_clip:hf-hub:org/name                  OpenCLIP format on the Hub (open_clip_config.json,
                                               open_clip_model.safetensors)
    open_clip:/models/biomedclip               OpenCLIP format in a local folder
    hf:org/name      hf:/models/rad-dino       Transformers format (config.json,
                                               preprocessor_config.json, model.safetensors)
    ...?features=pooled                        which pooled vector is the feature

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

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from medfm.backbones.ref import RANDOM, BackboneRef, weights_identity
from medfm.cache import file_digest
from medfm.errors import MedfmError, UnknownBackboneError, WeightsError

SOURCE_DIGEST_CHARS = 16  # hex digits of the weights identity "sha256:<digest>"
SOURCE_DIGEST_PREFIX = "sha256:"
FEATURES_KEY = "features"  # "...?features=pooled"
LOCAL_PREFIXES = ("/", "./", "../", "~")  # what makes the text after a prefix a folder
IMAGE_SIZE = 224  # a config without an image size


class MissingExtraError(MedfmError):
    """A backbone format whose loader (an optional dependency) is not installed."""


@dataclass(frozen=True)
class SourceName:
    """A parsed checkpoint name: which format, where its files are, which features."""

    format: CheckpointFormat
    repo: str | None = None  # hub repo id "org/name"
    folder: Path | None = None  # local folder (absolute)
    builtin: tuple[str, str] | None = None  # OpenCLIP (model, pretrained tag)
    features: str = ""  # one of format.features ("" when the format has no choice)


@dataclass(frozen=True)
class LocatedSource:
    """A source name with its files found and its data config read."""

    name: SourceName
    folder: Path | None  # the folder the files are in (hub snapshot or local); None: built-in
    files: tuple[Path, ...]  # config + weight files (the weights identity's input)
    data_config: dict  # input_size (3, S, S), mean, std, interpolation


def bad_name(name: str, detail: str) -> UnknownBackboneError:
    return UnknownBackboneError(
        f"cannot read backbone name {name!r}: {detail}. Spell hub checkpoints hf-hub:org/name "
        "(timm), open_clip:MODEL/TAG or open_clip:hf-hub:org/name (OpenCLIP), hf:org/name "
        "(Transformers), or give a local folder: local-dir:/path, open_clip:/path, hf:/path.")


def repo_id(name: str, text: str) -> str:
    org, sep, repo = text.partition("/")
    if not sep or not org or not repo or "/" in repo:
        raise bad_name(name, f"{text!r} is neither a hub repo id org/name nor a folder path")
    return text


def safe_folder_name(folder: Path) -> str:
    """A folder's name as it fits a store file name."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", folder.name).strip("-") or "folder"


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint format medfm loads with that format's own code (a BackboneFormat; each
    format module subclasses it and says how its data config is read and its model built)."""

    name: str  # first part of the canonical id and BackboneRef.format: "timm", "open_clip", "hf"
    prefixes: tuple[str, ...]  # what the user types, e.g. ("hf:",)
    module: str  # the package that loads it, e.g. "transformers"
    extra: str  # medfm's extra that installs it: pip install 'medfm[<extra>]'
    config_file: str  # the file that says how to build the model
    weights_files: tuple[str, ...]  # weight files looked for, in this order
    features: tuple[str, ...] = ()  # feature choices; the first is the default
    feature_help: str = ""  # what each choice means, for error messages
    folder_prefixes: tuple[str, ...] = ()  # prefixes after which any text is a folder
    takes_weights_file: bool = False  # --weights FILE loads into its models

    # -- naming (BackboneFormat.parse, canonical_id) ---------------------------------------------

    def parse(self, name: str) -> SourceName:
        """Parse a prefixed name (module docstring); raises UnknownBackboneError on bad syntax."""
        text = name.strip()
        prefix = next(p for p in self.prefixes if text.startswith(p))
        rest, _, query = text[len(prefix):].partition("?")
        features = self.features[0] if self.features else ""
        if query:
            key, _, value = query.partition("=")
            if key != FEATURES_KEY or not self.features or value not in self.features:
                choices = (f"{FEATURES_KEY}= one of {', '.join(self.features)} "
                           f"({self.feature_help})" if self.features
                           else f"no options for the {self.name} format")
                raise bad_name(name, f"unknown option {query!r}: {choices}")
            features = value
        if not rest:
            raise bad_name(name, "nothing after the prefix")
        if prefix in self.folder_prefixes or rest.startswith(LOCAL_PREFIXES):
            return SourceName(self, folder=Path(rest).expanduser().resolve(), features=features)
        return self.parse_location(name, rest, features)

    def parse_location(self, name: str, rest: str, features: str) -> SourceName:
        """What follows the prefix when it is not a folder: a hub repo id."""
        return SourceName(self, repo=repo_id(name, rest), features=features)

    def id_prefix(self, source: SourceName) -> str:
        return f"{self.name}:"

    def where(self, source: SourceName) -> str:
        """The id's location part: the repo (`/` -> `--`) or the folder's name."""
        return source.repo.replace("/", "--") if source.repo else safe_folder_name(source.folder)

    def source_id(self, source: SourceName) -> str:
        query = f"?{FEATURES_KEY}={source.features}" if source.features else ""
        return f"{self.id_prefix(source)}{self.where(source)}{query}"

    def canonical_id(self, name: str) -> str:
        """The canonical id of a prefixed name, from its spelling alone (no file is read)."""
        return self.source_id(self.parse(name))

    # -- finding the files (BackboneFormat.resolve) -----------------------------------------------

    def require_extra(self, name: str) -> None:
        """A one-line MissingExtraError when the format's loader is not importable."""
        try:
            found = importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtraError(
                f"backbone {name!r} is in the {self.name} format, which needs the package "
                f"{self.module}: pip install 'medfm[{self.extra}]'.")

    def read_data_config(self, source: SourceName, config: dict, config_path: Path,
                         name: str) -> tuple[dict, list[Path]]:
        """(data config, further files that define the model) from the format's config file."""
        raise NotImplementedError

    def locate(self, name: str, *, need_weights: bool) -> LocatedSource:
        """Find a source's files and read its data config (no torch import)."""
        source = self.parse(name)
        self.require_extra(name)
        config_path = config_file(source, name)
        config = read_json_config(config_path, name)
        data_config, more = self.read_data_config(source, config, config_path, name)
        files = [config_path, *more]
        if need_weights:
            files += weight_files(source, name)
        return LocatedSource(source, config_path.parent, tuple(files), data_config)

    def resolve(self, name: str, weights: str | None) -> BackboneRef:
        """The identity of a hub or local-folder checkpoint: its canonical id and weights
        identity: `sha256:` of its files, RANDOM, or a weights file ("file:" digest) where the
        format takes one."""
        located = self.locate(name, need_weights=weights is None)
        if weights is None:
            identity, path = files_digest(list(located.files)), None
        else:
            identity, path = weights_identity(weights)
            if path is not None and not self.takes_weights_file:
                raise WeightsError(
                    f"--weights FILE loads into timm-format models only; for {name!r} put the "
                    "weights in a folder in its format's own layout and name that folder.")
        canonical = self.source_id(located.name)
        return BackboneRef(id=canonical, weights=identity, path=path, name=name.strip(),
                           format=self.name,
                           folder=str(located.folder) if located.folder else None,
                           source_config=located.data_config, arch=canonical.partition("?")[0])

    def source_label(self, ref: BackboneRef, source: SourceName) -> str:
        """Where a built model's weights came from (Built.source)."""
        where = source.repo or ref.folder or "/".join(source.builtin or ())
        return RANDOM if ref.weights == RANDOM else f"{ref.format}:{where}"


def _missing_hint(source: SourceName) -> str:
    if source.repo:
        return ("download it where there is network (hf download "
                f"{source.repo}), or give a local folder (see medfm's README)")
    return f"put the {source.format.name}-format files in {source.folder}"


def _hub_file(repo: str, filename: str) -> Path | None:
    """The cached (or downloaded) hub file, or None when neither the cache nor the Hub has it."""
    # huggingface_hub (a dependency of timm) loads only when a hub file is looked up
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


def find_file(source: SourceName, filename: str) -> Path | None:
    """One of the checkpoint's files, or None."""
    if source.repo:
        return _hub_file(source.repo, filename)
    path = source.folder / filename
    return path if path.is_file() else None


def where_files(source: SourceName) -> str:
    return (f"the hub repo {source.repo} (local cache or Hub)" if source.repo
            else f"the folder {source.folder}")


def config_file(source: SourceName, name: str) -> Path:
    """The format's config file, or a WeightsError saying what is missing where."""
    if source.folder is not None and not source.folder.is_dir():
        raise WeightsError(f"backbone {name!r}: {source.folder} is not a folder.")
    path = find_file(source, source.format.config_file)
    if path is None:
        raise WeightsError(
            f"backbone {name!r}: {where_files(source)} has no {source.format.config_file}, so it "
            f"is not a {source.format.name}-format checkpoint; {_missing_hint(source)}.")
    return path


def weight_files(source: SourceName, name: str) -> list[Path]:
    """Every weight file of the checkpoint (the shards of a sharded one), or a WeightsError."""
    for filename in source.format.weights_files:
        path = find_file(source, filename)
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            return [path]
        shards = sorted(set(read_json_config(path, name).get("weight_map", {}).values()))
        found = [find_file(source, shard) for shard in shards]
        if not shards or None in found:
            raise WeightsError(f"backbone {name!r}: the shards listed in {path.name} are not all "
                               f"in {where_files(source)}; {_missing_hint(source)}.")
        return found
    raise WeightsError(
        f"backbone {name!r}: no weights in {where_files(source)} (looked for "
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
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path.name}|{file_digest(path, 'sha256')}\n".encode())
    return SOURCE_DIGEST_PREFIX + h.hexdigest()[:SOURCE_DIGEST_CHARS]


# -- data configs, read from each format's own files --------------------------------------------

def square_side(size, name: str, where: Path) -> int:
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


def data_config(side: int, mean, std, interpolation: str) -> dict:
    return {"input_size": (3, side, side), "mean": tuple(float(m) for m in mean),
            "std": tuple(float(s) for s in std), "interpolation": interpolation}
