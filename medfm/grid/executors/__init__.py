"""Executors: run grid jobs somewhere and stream their outcomes back to the driver.

    from medfm.grid.executors import make_executor
    executor = make_executor("local", workdir=w, max_workers=2)
    for outcome in executor.run(jobs): ...

Each executor declares itself in one module of this package: a class with a `name`, a frozen
`Options` dataclass (every option it takes, typed, one comment each; the CLI builds its flags
from them), `run(jobs) -> Iterator[JobOutcome]` yielding outcomes as jobs finish, and
`close()`. `make_executor` refuses an option the chosen executor does not take, before
anything runs. They only move `run_job` and its small frozen job specs around; the math lives
in the jobs and the registry writes in the driver. Ray and submitit are optional extras
(`pip install medfm[dist]`), imported only when used.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from medfm.errors import InvalidArgumentError
from medfm.grid.jobs import Job, JobOutcome
from medfm.plugins import load_package

DIST_HINT = "install the optional extras: pip install 'medfm[dist]'"

class Executor(Protocol):
    """What the driver needs of an executor."""

    name: str

    def run(self, jobs: Sequence[Job]) -> Iterator[JobOutcome]: ...

    def close(self) -> None: ...


_EXECUTORS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add an executor to the registry under `cls.name`."""
    _EXECUTORS[cls.name] = cls
    return cls


def executors() -> dict[str, type]:
    """Every registered executor class by name (each module of this package registers one)."""
    load_package(__name__)
    return dict(_EXECUTORS)


def check_counts(options, *, positive: tuple[str, ...] = (),
                 nonnegative: tuple[str, ...] = ()) -> None:
    """One-line error for an executor count that cannot work: `positive` ones must be > 0 and
    `nonnegative` ones >= 0 (None means "not set"); NaN and booleans are neither."""
    import math

    for name in (*positive, *nonnegative):
        value = getattr(options, name)
        if value is None:
            continue
        floor_ok = value > 0 if name in positive else value >= 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and math.isnan(value)) or not floor_ok:
            wanted = "greater than 0" if name in positive else "0 or more"
            raise InvalidArgumentError(f"{option_flag(name)} {value!r} must be {wanted}.")


def typed_options(name: str, given: dict[str, str]) -> dict[str, Any]:
    """Command-line text of executor options, parsed by executor `name`'s own types (each
    executor declares its options: one flag may be a whole number for one executor and a
    fraction for another); counts and durations must be finite and >= 0. An option the
    executor does not take is left for make_executor to refuse by name."""
    import math

    cls = executors().get(name)
    declared = {f.name: f for f in dataclasses.fields(cls.Options)} if cls else {}
    typed = {}
    for option, text in given.items():
        kind = declared[option].metadata.get("type", str) if option in declared else str
        if kind not in (int, float):
            typed[option] = kind(text)
            continue
        try:
            value = kind(text)
        except ValueError:
            words = "a whole number" if kind is int else "a number"
            raise InvalidArgumentError(
                f"{option_flag(option)} {text!r}: the {name} executor takes {words} here."
            ) from None
        if not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(
                f"{option_flag(option)} {text!r} is not a finite number >= 0.")
        typed[option] = value
    return typed


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def make_executor(name: str, *, workdir: str | os.PathLike, **options: Any):
    """The executor `name` built with `options`; an option it does not take is one clear error
    naming the executors that do."""
    found = executors()
    if name not in found:
        close = difflib.get_close_matches(name, found, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise InvalidArgumentError(f"unknown executor {name!r}.{hint} Use one of "
                                   f"{', '.join(sorted(found))}.")
    cls = found[name]
    takes = {f.name for f in dataclasses.fields(cls.Options)}
    for option in options:
        if option not in takes:
            others = sorted(n for n, c in found.items()
                            if option in {f.name for f in dataclasses.fields(c.Options)})
            where = f" (it is an option of {', '.join(others)})" if others else ""
            offered = ", ".join(option_flag(t) for t in sorted(takes)) or "no options"
            raise InvalidArgumentError(
                f"the {name} executor does not take {option_flag(option)}{where}; it takes "
                f"{offered}.")
    return cls(workdir=workdir, **options)


def failed(job: Job, where: str, exc: BaseException) -> JobOutcome:
    """The outcome of a job whose worker died."""
    return JobOutcome(job, [], f"{where}: {type(exc).__name__}: {exc}", 0.0)


def needs_gpu(job: Job) -> bool:
    """Whether a job computes on a GPU: extraction and fine-tuning (they run the backbone)
    unless their device is the CPU; a probe where it fits with cuML or its device is CUDA (the
    planner resolves a probe's device, so this never depends on the worker asking)."""
    if job.kind != "probe":
        return job.device != "cpu"
    return job.probe.solver == "cuml" or (job.probe.device or "").startswith("cuda")
