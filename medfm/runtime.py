"""Where a run computes and with what software: device choice and naming, version capture.

    from medfm.runtime import resolve_device, device_name, versions
    dev = resolve_device(None)           # CUDA when a GPU is visible, else CPU
    resolve_precision(None, None)        # "bfloat16" on CUDA, "float32" elsewhere
    versions("torch", "timm")            # {"medfm": ..., "python": ..., "numpy": ..., ...}
    software_versions()                  # what bundles record and `medfm --version` prints
    with deterministic_algorithms():     # CUDA kernels that give the same bits every run
        ...

Versions are read from the installed packages' metadata, so recording them imports nothing
(importing torch only to read its version string costs two seconds).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import sys
from collections.abc import Iterator
from importlib import metadata

from medfm import __version__
from medfm.errors import InvalidArgumentError


# A frozen forward pass computes in float32 (TF32 off on CUDA: float32 means float32) or under
# bfloat16 autocast (CUDA's default: 2-4x the speed, features within ~1e-2 of float32).
PRECISIONS = ("float32", "bfloat16")


def versions(*packages: str) -> dict[str, str]:
    """medfm, Python and numpy versions, plus each installed package of `packages`."""
    found = {"medfm": __version__, "python": platform.python_version()}
    for name in ("numpy", *packages):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


RECORDED_PACKAGES = ("torch", "torchvision", "timm", "medmnist", "scikit-learn", "scipy",
                     "pandas", "h5py")  # what a bundle records and `medfm --version` prints


def software_versions() -> dict[str, str]:
    """medfm's version and those of the libraries its numbers rest on (RECORDED_PACKAGES, when
    installed), plus the CUDA torch was built with and the GPU it sees, when one is there: what
    a result bundle records and what `medfm --version` prints (one function for both)."""
    found = versions(*RECORDED_PACKAGES)
    if cuda_available():  # imports torch only where a GPU can be
        import torch

        found["cuda"] = str(torch.version.cuda)
        found["gpu"] = torch.cuda.get_device_name(0)
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


# Paths one of which exists wherever CUDA can see a GPU on Linux: the driver's proc entry and
# control node (also inside containers given a GPU), and WSL2's GPU paravirtualization device.
NVIDIA_MARKERS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU, without importing torch (2 s) where there cannot be one:
    torch not installed, or a Linux machine with no NVIDIA driver loaded."""
    if importlib.util.find_spec("torch") is None:
        return False
    if sys.platform.startswith("linux") and not any(map(os.path.exists, NVIDIA_MARKERS)):
        return False  # no NVIDIA kernel driver or device node: CUDA cannot see a GPU
    import torch

    return torch.cuda.is_available()


def device_type(device: str | None) -> str:
    """"cpu" or "cuda": the kind of device `device` names, None meaning CUDA when a GPU is
    visible; answered without importing torch where no GPU can be (no NVIDIA driver)."""
    if device is None:
        return "cuda" if cuda_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device {device!r} is not valid; use cpu or cuda.")
    if kind == "cuda" and not cuda_available():
        raise InvalidArgumentError("--device cuda asked for, but no CUDA GPU is visible; "
                                   "use --device cpu.")
    return kind


def resolve_precision(precision: str | None, device: str | None) -> str:
    """The arithmetic of a frozen forward pass: `precision` ("float32" or "bfloat16"), or for
    None / "auto" bfloat16 autocast on CUDA and float32 elsewhere (see PRECISIONS)."""
    if precision in (None, "auto"):
        return "bfloat16" if device_type(device) == "cuda" else "float32"
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision {precision!r} is not one of auto, "
                                   f"{', '.join(PRECISIONS)}.")
    return precision


def device_name(dev) -> str:
    """What a result records about the device it computed on: the GPU's name, or the CPU's."""
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


CUBLAS_WORKSPACE = ":4096:8"  # CUBLAS_WORKSPACE_CONFIG that makes cuBLAS deterministic (CUDA docs)
NONDETERMINISTIC = "does not have a deterministic implementation"  # torch's error, op name first


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Inside: every torch op runs its deterministic implementation or raises (one that has
    none), cuDNN picks no algorithm by timing and uses only deterministic ones, and cuBLAS gets
    the fixed workspace its reproducibility needs (CUBLAS_WORKSPACE_CONFIG, unless already set).
    Same inputs, same GPU model and software: same bits. On a CPU torch is deterministic anyway.
    Everything is put back on leaving."""
    import torch

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    except RuntimeError as exc:
        if NONDETERMINISTIC not in str(exc):
            raise
        op = str(exc).split(NONDETERMINISTIC)[0].strip()
        raise InvalidArgumentError(
            f"deterministic run asked for, but {op} has no deterministic implementation on "
            f"this device; run without --deterministic.") from exc
    finally:
        enabled, warn_only, cudnn_deterministic, cudnn_benchmark, workspace = before
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
