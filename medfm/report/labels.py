"""Readable variant names: a short label for tables, legends and filters, the full settings
on hover.

A variant (medfm.report.tables.annotate) is named "backbone · method" plus `field=value` for
each key field that tells it apart from another variant of the same backbone and method, e.g.
"vit_base_patch16_clip_224.laion2b_ft_in12k_in1k · logreg resize_policy=pad". Its label keeps
the backbone's shortest prefix (at least `BACKBONE_CHARS` characters) that no other backbone of
the report shares, the method, and each distinguishing field with a shorter name and value; two
labels that still collide get " #2", " #3". The full settings are every key field of the
variant's runs (a field with several values lists them), one per line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from medfm.report.tables import VARIANT_FIELDS

BACKBONE_CHARS = 28  # a backbone id longer than this is cut where it stays unique
VALUE_CHARS = 14  # a distinguishing field's value longer than this is cut
PARAMS_CHARS = 400  # method settings (JSON) shown on hover, at most
ELLIPSIS = "…"
FIELD_NAMES = {  # how a label names a distinguishing key field
    "data_digest": "data", "resize_policy": "resize", "input_size": "input",
    "feature_kind": "features", "select_metric": "select-by",
}
SETTINGS_FIELDS = ("backbone", "method", "paradigm", *VARIANT_FIELDS)  # hover lines, in order


@dataclass(frozen=True)
class VariantLabel:
    """How a report shows one variant."""

    variant: str  # the full variant name (tables.annotate), as in CSV and Markdown
    label: str  # short and unique among the report's variants
    settings: str  # every key field of its runs, "field: value" per line (hover text)
    backbone: str  # canonical backbone id
    method: str  # method as shown (tables.shown_method)
    paradigm: str  # linear probe | kNN | fine-tune | ...


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + ELLIPSIS


def short_backbones(backbones) -> dict[str, str]:
    """Each backbone id cut to its shortest prefix of >= BACKBONE_CHARS characters that no other
    id in `backbones` starts with ("…" marks a cut)."""
    names = sorted(set(backbones))
    out = {}
    for name in names:
        others = [o for o in names if o != name]
        length = BACKBONE_CHARS - 1
        while length < len(name) and any(o.startswith(name[:length]) for o in others):
            length += 1
        out[name] = name if length >= len(name) - 1 else name[:length] + ELLIPSIS
    return out


def _extras(variant: str, backbone: str, method: str) -> list[str]:
    """The `field=value` parts of a variant name after "backbone · method", shortened."""
    rest = variant[len(f"{backbone} · {method}"):].split()
    parts = []
    for part in rest:
        name, _, value = part.partition("=")
        parts.append(f"{FIELD_NAMES.get(name, name)}={_cut(value, VALUE_CHARS)}")
    return parts


def _settings(runs: pd.DataFrame) -> str:
    """The hover text of one variant's runs: one "field: value(s)" line per SETTINGS_FIELDS."""
    lines = []
    for name in SETTINGS_FIELDS:
        values = sorted({str(v) for v in runs[name]})
        if name == "params":
            values = [json.dumps(json.loads(v), sort_keys=True) for v in values]
        text = " | ".join(values)
        lines.append(f"{name}: {_cut(text, PARAMS_CHARS)}")
    return "\n".join(lines)


def variant_labels(annotated: pd.DataFrame) -> dict[str, VariantLabel]:
    """{variant: VariantLabel} for every variant of `annotated` (tables.annotate's frame)."""
    backbones = short_backbones(annotated["backbone"])
    labels, seen = {}, {}
    for variant, runs in annotated.groupby("variant", sort=True):
        first = runs.iloc[0]
        label = " ".join([f"{backbones[first['backbone']]} · {first['method']}",
                          *_extras(variant, first["backbone"], first["method"])])
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label} #{seen[label]}"
        labels[variant] = VariantLabel(
            variant=variant, label=label, settings=_settings(runs), backbone=first["backbone"],
            method=first["method"], paradigm=first["paradigm"])
    return labels
