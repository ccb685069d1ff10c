"""Weights as tensors: reading a checkpoint file (weights only, never unpickling code), loading
it strictly into a model, creating a timm model under a fixed seed, and the digest that
identifies the tensors a model holds. Shared by every backbone format that builds a torch model
(medfm.backbones.formats) and by the offline weight sources (medfm.backbones.offline).

    state = read_checkpoint(Path("ckpt.safetensors"))      # {key: tensor}
    model = seeded_create("test_resnet", pretrained=False, num_classes=0)
    load_strict(model, state, origin="file ckpt.safetensors")
    state_dict_digest(model)                                 # sha256 hex of keys, dtypes, bytes
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import timm
import torch

from medfm.backbones.ref import WEIGHTS_HINT
from medfm.errors import WeightsError

CREATION_SEED = 0  # torch seed around every model creation: same name -> same init and digest
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
CHECKPOINT_WRAPPER_KEYS = ("state_dict", "model")  # {"state_dict": sd} / {"model": sd} wrappers
DATA_PARALLEL_PREFIX = "module."  # keys saved from DataParallel / DDP models
SHOWN_KEYS = 5  # mismatched keys quoted in a WeightsError
WHY_CHARS = 160  # of a loader's own error message quoted in a WeightsError


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
            from safetensors.torch import load_file  # loaded only for a .safetensors file

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


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
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


def seeded_create(timm_id: str, *, pretrained: bool, init_seed: int = CREATION_SEED,
                  **kwargs) -> torch.nn.Module:
    """timm.create_model under torch.manual_seed(init_seed), the caller's RNG state restored: a
    new head or a random init is the same on every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return timm.create_model(timm_id, pretrained=pretrained, **kwargs)
