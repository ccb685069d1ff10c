"""Prompts of zero-shot classification: templates x class names, per task.

    from medfm.resolve.prompts import class_prompts
    prompts = class_prompts(info, templates=DEFAULT_TEMPLATES)   # one tuple of texts per column

Class names are the dataset's label names (MedMNIST's INFO labels, an imported dataset's class
names), or the user's (one per line, index order: `--zs-class-names FILE`). Templates hold one
"{}" where the name goes; the default set is DEFAULT_TEMPLATES, a user set comes from a file
(one template per line, `--zs-templates FILE`). Several templates are an ensemble: a column's
text embedding is the mean of its templates' L2-normalized embeddings (CLIP's prompt
ensembling), normalized again.

Per task (one column of scores each):
- binary, multi-class, ordinal: one column per class, prompts = templates of its name;
- multi-label: one column per label, a PAIR of prompt sets: templates of "{name}" (present) and
  of NEGATION.format(name) (absent); the label's score is the softmax over that pair.
"""

from __future__ import annotations

import os
from pathlib import Path

from medfm.data import DatasetInfo, Task
from medfm.errors import InvalidArgumentError

DEFAULT_TEMPLATES = ("a medical image of {}.",)  # the default set: one template
NEGATION = "no {}"  # the absent prompt of a multi-label label
PROMPT_FILE_BYTES_MAX = 1_048_576  # a templates or class-names file (1 MiB)
PROMPTS_MAX = 1_000  # templates, or class names, in one file


def read_lines(path: str | os.PathLike, what: str) -> tuple[str, ...]:
    """The non-empty lines of a small text file (templates or class names)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{what} file {path} does not exist.")
    if path.stat().st_size > PROMPT_FILE_BYTES_MAX:
        raise InvalidArgumentError(f"{what} file {path} is over {PROMPT_FILE_BYTES_MAX:,} bytes.")
    try:
        lines = tuple(s.strip() for s in path.read_text(encoding="utf-8").splitlines())
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"{what} file {path} is not UTF-8 text.") from None
    lines = tuple(s for s in lines if s)
    if not lines or len(lines) > PROMPTS_MAX:
        raise InvalidArgumentError(f"{what} file {path} holds {len(lines)} lines; give 1 to "
                                   f"{PROMPTS_MAX}, one per line.")
    return lines


def read_templates(path: str | os.PathLike) -> tuple[str, ...]:
    """Templates from a file, each with exactly one "{}"."""
    templates = read_lines(path, "templates")
    for t in templates:
        if t.count("{}") != 1 or t.replace("{}", "").count("{") + t.count("}") > 1:
            raise InvalidArgumentError(f"template {t!r} in {path} needs exactly one {{}} where "
                                       "the class name goes (and no other braces).")
    return templates


def class_names(info: DatasetInfo, given: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The names prompts are built from: `given` (checked against the dataset's count) or the
    dataset's label names."""
    if given is None:
        return tuple(info.label_names)
    if len(given) != info.n_classes:
        kind = "labels" if info.task is Task.MULTI_LABEL else "classes"
        raise InvalidArgumentError(
            f"{info.flag} has {info.n_classes} {kind} ({', '.join(info.label_names)}); the "
            f"class-names file gives {len(given)}.")
    return tuple(given)


def class_prompts(info: DatasetInfo, templates: tuple[str, ...],
                  names: tuple[str, ...] | None = None) -> list[tuple[str, ...]]:
    """The prompt sets of every text embedding the task needs: one per class, or for
    multi-label two per label (present, absent), in that order."""
    names = class_names(info, names)
    if info.task is Task.MULTI_LABEL:
        sets = []
        for name in names:
            sets.append(tuple(t.format(name) for t in templates))
            sets.append(tuple(t.format(NEGATION.format(name)) for t in templates))
        return sets
    return [tuple(t.format(name) for t in templates) for name in names]
