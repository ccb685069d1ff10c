"""Registries filled by the modules of a package (probe methods, their declarations, backbone
formats, grid executors): each module registers itself when imported, so adding one is one new
module. `load_package` imports every public module of such a package, once.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from types import ModuleType


@functools.cache
def load_package(package: str) -> tuple[ModuleType, ...]:
    """Every module of `package` whose name does not start with "_", imported once, in name
    order (a package may call this for itself while its own __init__ runs)."""
    root = importlib.import_module(package)
    names = sorted(m.name for m in pkgutil.iter_modules(root.__path__)
                   if not m.name.startswith("_"))
    return tuple(importlib.import_module(f"{package}.{name}") for name in names)
