"""`--method zero-shot`, declared: CLIP-family zero-shot classification from class names, keyed
by its prompts (the templates, and the class names when given: as text, so the same prompts from
another file are the same run). No training subset: one run per store. The scoring is
medfm.probe.methods.zeroshot (text towers in medfm.probe.zeroshot).
"""

from __future__ import annotations

from medfm.resolve.methods import MethodOption, MethodSpec, declare
from medfm.resolve.prompts import DEFAULT_TEMPLATES, read_lines, read_templates

METHOD_NAME = "zero-shot"


def params(options: dict) -> dict:
    """The key's settings: the templates (default or a file's lines) and any class names."""
    templates = (read_templates(options["zs_templates"]) if options["zs_templates"]
                 else DEFAULT_TEMPLATES)
    out = {"templates": list(templates)}
    if options["zs_class_names"]:
        out["class_names"] = list(read_lines(options["zs_class_names"], "class-names"))
    return out


SPEC = declare(MethodSpec(
    name=METHOD_NAME, paradigm="zero-shot", line_style="--", selections=("none",),
    params=lambda selection, options: params(options),
    select_metric=lambda task, p: "", trains=False,
    options=(MethodOption("zs_templates", None, (),
                          "zero-shot: a file of prompt templates, one per line with {} for the "
                          "class name (default: 'a medical image of {}.')"),
             MethodOption("zs_class_names", None, (),
                          "zero-shot: a file of class (or label) names, one per line in index "
                          "order (default: the dataset's label names)")),
))
