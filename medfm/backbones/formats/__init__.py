"""Backbone formats: one module per way of naming and building a backbone, each implementing
`BackboneFormat` (base.py): parse a name, its canonical id, resolve it to an identity (weights
identity, checkpoint files and their digest, data config; no torch), build the model.

    timm_names.py   timm registry names and medfm aliases (the fallback: names with no prefix),
                    weights from medfm.backbones.offline, timm's hub, a file or a seeded init
    timm_hub.py     hf-hub:org/name, local-dir:/path      timm's checkpoint format
    openclip.py     open_clip:MODEL/TAG, open_clip:hf-hub:org/name, open_clip:/path
    hf.py           hf:org/name, hf:/path                 Transformers

    format_for("hf:facebook/dinov2-small").resolve(name, weights=None)   # a BackboneRef
    format_named(ref.format).build(ref, num_classes=2, in_chans=3, init_seed=0)

**To add a backbone format**, add one module to this folder that defines `FORMAT`, an object
with the BackboneFormat attributes and methods (a checkpoint on the Hub or in a folder: subclass
medfm.backbones.hub.CheckpointFormat and write `read_data_config` and `build`), and its tests.
Every module here is found and registered on import; a format defined elsewhere (a plug-in, a
test) registers with `register_format(fmt)`, in every process that resolves or builds its names
(grid workers started afresh import this folder, not the caller's registrations). A format's
prefixes must not overlap another's.
Its ids and weights identities name stores and run keys: never change how an existing format
spells them (tests/test_identities.py pins them).
"""

from __future__ import annotations


from medfm.backbones.formats.base import BackboneFormat, Built
from medfm.errors import InvalidArgumentError
from medfm.plugins import load_package

FORMATS: dict[str, BackboneFormat] = {}  # BackboneRef.format -> its format


def register_format(fmt: BackboneFormat) -> BackboneFormat:
    """Add a format (replacing one of the same name); its prefixes must be new."""
    if not isinstance(fmt, BackboneFormat):
        raise TypeError(f"{fmt!r} does not implement medfm.backbones.formats.BackboneFormat")
    for other in FORMATS.values():
        clash = [p for p in fmt.prefixes for q in other.prefixes
                 if other.name != fmt.name and (p.startswith(q) or q.startswith(p))]
        if clash or (not fmt.prefixes and not other.prefixes and other.name != fmt.name):
            raise ValueError(f"format {fmt.name!r} claims names format {other.name!r} claims "
                             f"({', '.join(clash) or 'no prefix: both are the fallback'})")
    FORMATS[fmt.name] = fmt
    return fmt


def format_for(name: str) -> BackboneFormat:
    """The format that claims `name`: the one whose prefix it starts with, else the fallback
    (timm registry names)."""
    text = name.strip()
    fallback = None
    for fmt in FORMATS.values():
        if not fmt.prefixes:
            fallback = fmt
        elif text.startswith(fmt.prefixes):
            return fmt
    return fallback


def format_named(name: str) -> BackboneFormat:
    """The format of a BackboneRef (`ref.format`)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"backbone format {name!r} is not registered (known: {', '.join(FORMATS)}); register "
            "it with medfm.backbones.formats.register_format.") from None


def _discover() -> None:
    """Register the FORMAT of every module in this folder (sorted by module name)."""
    for module in load_package(__name__):
        if hasattr(module, "FORMAT"):
            register_format(module.FORMAT)


_discover()

__all__ = ["FORMATS", "BackboneFormat", "Built", "format_for", "format_named",
           "register_format"]
