"""Command-line helpers shared by every verb's parser and printer (medfm.cli and the verbs
registered from other packages, e.g. medfm.imported.cli): list options and plain tables.
"""

from __future__ import annotations

from medfm.errors import InvalidArgumentError


def csv_items(text: str | None, option: str) -> list[str] | None:
    """The items of a comma-separated option, or None when it was not given; a given option
    with an empty item ("", "a,,b") is an error, never "no filter"."""
    if text is None:
        return None
    items = [part.strip() for part in text.split(",")]
    if not all(items):
        raise InvalidArgumentError(f"{option} {text!r} has an empty item; give a "
                                   f"comma-separated list, or leave the option out.")
    return items


def sizes(text: str | None) -> list[int] | None:
    """--size as published MedMNIST sizes, or None when it was not given."""
    # medfm.data loads the dataset catalogue (0.3 s): only for a verb that reads --size
    from medfm.data import check_size

    items = csv_items(text, "--size")
    return None if items is None else [check_size(item) for item in items]


def print_table(rows: list[dict], columns: list[str]) -> None:
    """`rows` as a plain left-aligned text table of `columns` ("(none)" when empty)."""
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
