"""Where medfm reads data and writes stores and results.

One place resolves both roots, in the same order for the CLI and the API:
explicit argument, then environment variable, then default.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from medfm.errors import InvalidArgumentError

WORKDIR_ENV = "MEDFM_WORKDIR"  # where stores/, registry.sqlite, checkpoints/ live
DATA_ROOT_ENV = "MEDFM_DATA_ROOT"  # where the MedMNIST npz files live
DEFAULT_WORKDIR = "medfm-work"  # relative to the current directory


def resolve_workdir(workdir: str | os.PathLike | None = None, *, create: bool = True) -> Path:
    """`workdir` if given, else $MEDFM_WORKDIR, else ./medfm-work (created on demand, unless
    `create` is False: a verb that only reads).

    A path that is a file, or lies under one, is an InvalidArgumentError naming where it came
    from; a folder that cannot be created for want of permission or space raises the OSError
    (the CLI prints those on one line).
    """
    if workdir:
        chosen, source = workdir, "--workdir"
    elif os.environ.get(WORKDIR_ENV):
        chosen, source = os.environ[WORKDIR_ENV], f"${WORKDIR_ENV}"
    else:
        chosen, source = DEFAULT_WORKDIR, "the default work directory"
    path = Path(chosen).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder")
        if create:
            path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, FileNotFoundError) as exc:
        raise InvalidArgumentError(
            f"work directory {path} ({source}) cannot be used: {exc.strerror}; point "
            f"--workdir or ${WORKDIR_ENV} at a folder (it is created if missing).") from None
    return path


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """`data_root` if given, else $MEDFM_DATA_ROOT, else medmnist's default (~/.medmnist)."""
    chosen = data_root or os.environ.get(DATA_ROOT_ENV)
    if chosen:
        return Path(chosen).expanduser()
    return Path("~/.medmnist").expanduser()
