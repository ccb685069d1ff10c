"""Errors a user can cause. The CLI prints each on one line and exits with code 2.

Every message says what to do next. Tracebacks are reserved for bugs.
"""

import errno


class MedfmError(Exception):
    """Base class of user-facing errors: bad input, missing files, corrupt stores."""


class UnknownDatasetError(MedfmError):
    """A dataset flag or size that MedMNIST does not have."""


class DataFileMissingError(MedfmError):
    """An npz file that is not on disk and could not be downloaded."""


class InvalidDataFileError(MedfmError):
    """An npz file that is there but does not hold the dataset MedMNIST's INFO describes
    (unreadable, a missing array, wrong shape, dtype, label count or label range)."""


class UnknownBackboneError(MedfmError):
    """A backbone name that neither timm nor medfm's aliases know."""


class WeightsError(MedfmError):
    """A weights file or offline weight source that cannot be loaded."""


class StoreError(MedfmError):
    """A feature store that is missing, incomplete or corrupt."""


class InvalidArgumentError(MedfmError):
    """A bad value: fraction, shots, seed, resize policy, device, dtype..."""


class RegistryError(MedfmError):
    """A results registry that cannot be opened or queried."""


class BundleError(MedfmError):
    """A result bundle that cannot be merged: damaged, not a bundle, or of a newer format."""


class DiskFullError(MedfmError):
    """A write that failed for want of space or quota (ENOSPC, EDQUOT, EFBIG)."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# how HDF5 reports them: its OSError carries the C errno in the message, not in .errno
DISK_FULL_TEXTS = ("errno = 28,", "errno = 122,", "errno = 27,", "No space left",
                   "Disk quota exceeded", "File too large")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it arose from (torch.save wraps a failed write's OSError in a
    RuntimeError), is a write that failed for want of space, quota or file-size limit."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and (exc.errno in DISK_FULL_ERRNOS or any(
                text in str(exc) for text in DISK_FULL_TEXTS)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class MedfmWarning(UserWarning):
    """Something that runs but probably not as the user wants; the CLI prints it on one line."""
