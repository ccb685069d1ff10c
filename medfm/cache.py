"""Machine-wide caches that make "is this done?" cheap: file digests and small JSON snapshots.

    from medfm.cache import file_digest
    file_digest("breastmnist.npz", "md5")     # read once; later calls are one stat and one read

Everything lives under `$MEDFM_CACHE` (else `$XDG_CACHE_HOME/medfm`, else `~/.cache/medfm`).
A file's digest is cached under the file's resolved path, size and modification time (ns), so a
replaced or edited file is digested afresh; each entry is one small file written atomically, so
any number of processes can fill the cache at once. Deleting the folder only costs time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CACHE_ENV = "MEDFM_CACHE"  # root of medfm's caches
READ_BYTES = 1 << 24  # digest files 16 MB at a time
DIGEST_ALGORITHMS = ("md5", "sha256")  # md5: comparable with MedMNIST's published MD5s


def cache_dir(*parts: str) -> Path:
    """`$MEDFM_CACHE/<parts>` (else `$XDG_CACHE_HOME/medfm`, else `~/.cache/medfm`), created."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "medfm")
    path = Path(root, *parts).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no temp file behind
        raise


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None when it is missing or unreadable (a cache miss)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes, cached by (resolved path, size, mtime_ns)."""
    if algorithm not in DIGEST_ALGORITHMS:
        raise ValueError(f"digest algorithm {algorithm!r} is not one of {DIGEST_ALGORITHMS}")
    resolved = Path(path).resolve()
    stat = resolved.stat()
    identity = f"{algorithm}|{resolved}|{stat.st_size}|{stat.st_mtime_ns}"
    entry = cache_dir("digests") / hashlib.sha1(identity.encode()).hexdigest()
    cached = read_json(entry)
    if isinstance(cached, dict) and cached.get("identity") == identity:
        return cached["digest"]
    digest = hashlib.new(algorithm)
    with open(resolved, "rb") as fh:
        while block := fh.read(READ_BYTES):
            digest.update(block)
    value = digest.hexdigest()
    write_atomic(entry, json.dumps({"identity": identity, "digest": value}))
    return value
