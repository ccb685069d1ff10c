"""Where a run computes and with what software: device choice and naming, version capture.

    from medfm.runtime import resolve_device, device_name, versions
    dev = resolve_device(None)           # CUDA when a GPU is visible, else CPU
    versions("torch", "timm")            # {"medfm": ..., "python": ..., "numpy": ..., ...}

Versions are read from the installed packages' metadata, so recording them imports nothing
(importing torch only to read its version string costs two seconds).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

from medfm import __version__
from medfm.errors import InvalidArgumentError


def versions(*packages: str) -> dict[str, str]:
    """medfm, Python and numpy versions, plus each installed package of `packages`."""
    found = {"medfm": __version__, "python": platform.python_version()}
    for name in ("numpy", *packages):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def resolve_device(device: str | None):
    """`device` as a torch.device ("cpu", "cuda", "cuda:1"); None means CUDA when available."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidArgumentError(f"device {device!r} is not valid; use cpu or cuda.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda asked for, but no CUDA GPU is visible; "
                                   "use --device cpu.")
    return dev


def device_name(dev) -> str:
    """What a result records about the device it computed on: the GPU's name, or the CPU's."""
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
