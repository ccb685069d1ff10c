"""Where medfm reads data and writes stores and results.

One place resolves both roots, in the same order for the CLI and the API:
explicit argument, then environment variable, then default.
"""

from __future__ import annotations

import os
from pathlib import Path

WORKDIR_ENV = "MEDFM_WORKDIR"  # where stores/, registry.sqlite, checkpoints/ live
DATA_ROOT_ENV = "MEDFM_DATA_ROOT"  # where the MedMNIST npz files live
DEFAULT_WORKDIR = "medfm-work"  # relative to the current directory


def resolve_workdir(workdir: str | os.PathLike | None = None) -> Path:
    """`workdir` if given, else $MEDFM_WORKDIR, else ./medfm-work (created on demand)."""
    chosen = workdir or os.environ.get(WORKDIR_ENV) or DEFAULT_WORKDIR
    path = Path(chosen).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """`data_root` if given, else $MEDFM_DATA_ROOT, else medmnist's default (~/.medmnist)."""
    chosen = data_root or os.environ.get(DATA_ROOT_ENV)
    if chosen:
        return Path(chosen).expanduser()
    return Path("~/.medmnist").expanduser()
