"""One writer at a time: an exclusive advisory file lock, released when its holder dies.

    with exclusive_lock(folder / ".locks" / "NAME.lock", label="import NAME"):
        ...  # the only process writing NAME

The lock is flock(2): the OS releases it when its holder exits, killed or not, so a stale lock
never blocks a rerun. The lock file keeps the holder's pid for the waiting line.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockHeld(Exception):
    """The lock is held by another process (and the caller asked not to wait)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder  # its pid, as it wrote it ("?" if unknown)


@contextmanager
def exclusive_lock(lock_path: Path, *, label: str, wait: bool = True) -> Iterator[None]:
    """Hold the lock at `lock_path` (its folder is created). A second holder waits, after one
    line on stderr naming the holder and `label`, or with wait=False gets LockHeld."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            fh.seek(0)
            holder = fh.read().strip() or "?"
            if not wait:
                raise LockHeld(holder) from None
            print(f"waiting for pid {holder}, which is writing {label}", file=sys.stderr,
                  flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
