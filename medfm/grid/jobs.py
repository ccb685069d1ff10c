"""Grid jobs: small frozen (picklable) specs, each run by one pure function on any worker.

A job carries the request the planner resolved (medfm.resolve), so it computes exactly the run
the plan counted. It computes and returns; it never writes the results registry. `run_job`
turns any exception into a failed `JobOutcome` carrying the error, so one bad job (say, weights
that cannot be downloaded) never stops the grid. Jobs are idempotent: an extract job whose store
exists returns at once, and a finetune job resumes from its checkpoint. Every path in a job is
absolute, so a worker on another machine or in another folder reads and writes the same work
directory.
"""

from __future__ import annotations

import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medfm.errors import MedfmError, MedfmWarning
from medfm.sampling import SubsetSpec
from medfm.store.registry import ResultRow

if TYPE_CHECKING:
    from medfm.resolve.finetune import FinetuneRequest
    from medfm.resolve.probe import ProbeRequest
    from medfm.resolve.store import StoreRequest

TRACEBACK_LINES = 6  # lines of a bug's traceback kept in its outcome
JobResult = tuple[ResultRow, np.ndarray, np.ndarray]  # (row, test scores, test labels)


def _subset_label(spec: SubsetSpec) -> str:
    if spec.fraction is None and spec.shots is None:
        return "zero-shot"
    subset = f"{spec.fraction:g}" if spec.fraction is not None else f"{spec.shots}-shot"
    return f"{subset} seed {spec.seed}"


def _show(caught: list[warnings.WarningMessage], label: str) -> None:
    """Print a job's medfm warnings on one line naming the job, to the stderr of the process
    that ran it (the terminal for local and Ray, the job's log under SLURM); pass other
    warnings on as Python shows them."""
    for w in caught:
        if issubclass(w.category, MedfmWarning):
            print(f"medfm grid: warning: {label}: {w.message}", file=sys.stderr, flush=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


@dataclass(frozen=True)
class ExtractJob:
    """Embed every split of one dataset file with one backbone into a feature store."""

    request: StoreRequest  # resolved by the planner (medfm.resolve)
    device: str | None  # "cpu", "cuda" or None (CUDA when visible)
    workdir: str  # absolute
    compile: bool = False  # run the backbone torch.compile-d (provenance, not identity)

    kind = "extract"

    @property
    def where(self) -> str:
        """"breastmnist@28 resnet18", the backbone as the spec names it."""
        b = self.request.backbone
        return f"{self.request.dataset.label} {b.name or b.id}"

    @property
    def label(self) -> str:
        return f"extract {self.where}"

    def store_path(self) -> str:
        """The finished store's path (builds it if missing; returns at once if it exists)."""
        from medfm.extract import extract_request  # a stage (torch): in the worker only

        return str(extract_request(self.request, device=self.device, workdir=self.workdir,
                                   progress=False, compile=self.compile).path)

    def run(self) -> list[JobResult]:
        self.store_path()
        return []


@dataclass(frozen=True)
class ProbeJob:
    """Fit one probe on training subsets of an extracted store, one row each.

    A job holds one subset, or every seed of the full training set (fraction 1.0), where all
    seeds draw the same images: those share one fit (as `medfm probe` does), unless the seed
    also changes the fit (selection="holdout" holds out a seeded share).
    """

    store: ExtractJob  # the extraction this probe reads (its dependency)
    specs: tuple[SubsetSpec, ...]
    probe: ProbeRequest  # method, settings, selection, solver, device

    kind = "probe"

    @property
    def label(self) -> str:
        first = self.specs[0]
        subset = (_subset_label(first) if len(self.specs) == 1 else
                  f"{first.fraction:g} seeds {','.join(str(s.seed) for s in self.specs)}")
        return f"{self.probe.method} {self.store.where} {subset}"

    def run(self) -> list[JobResult]:
        # the probe stage (scikit-learn or torch) loads in the worker that runs the job
        from medfm.probe.run import StoreArrays, for_work, probe_job
        from medfm.store.features import FeatureStore

        store = FeatureStore(self.store.store_path())
        probe = for_work(self.probe, [(store, spec) for spec in self.specs])
        arrays, shared_fits = StoreArrays.load(store, device=probe.features_device()), {}
        return [probe_job(store, spec=spec, probe=probe, arrays=arrays,
                          shared_fits=shared_fits) for spec in self.specs]


@dataclass(frozen=True)
class FinetuneJob:
    """Train one backbone end to end on one training subset and test it."""

    request: FinetuneRequest  # resolved by the planner
    device: str | None
    workdir: str  # absolute
    compile: bool = False  # train the model torch.compile-d (recorded, not keyed)

    kind = "finetune"

    @property
    def label(self) -> str:
        r = self.request
        what = "head-probe" if r.recipe.freeze_backbone else "finetune"
        return (f"{what} {r.dataset.label} {r.backbone.name or r.backbone.id} "
                f"{_subset_label(r.spec)}")

    def run(self) -> list[JobResult]:
        # the fine-tune stage (torch, timm) loads in the worker that runs the job
        from medfm.extract import release_models
        from medfm.finetune import finetune_job

        release_models()  # a model this worker kept from its extractions leaves the GPU
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MedfmWarning)
            row, scores, y_true = finetune_job(self.request, device=self.device,
                                               workdir=self.workdir, progress=False,
                                               compile=self.compile)
        _show(caught, self.label)
        return [(row, scores, y_true)]


Job = ExtractJob | ProbeJob | FinetuneJob


@dataclass
class JobOutcome:
    """What a job sent back to the driver."""

    job: Job
    rows: list[JobResult]
    error: str | None  # None when the job succeeded
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.error is None


def run_job(job: Job, threads: int | None = None) -> JobOutcome:
    """Run `job` with `threads` torch CPU threads (None: leave as is); any exception becomes a
    failed outcome (user errors as one line, bugs with the end of their traceback).

    Executors pass the CPUs they give each job, so the same job computes the same floats on
    every executor.
    """
    t0 = time.perf_counter()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        rows = job.run()
    except MedfmError as exc:
        return JobOutcome(job, [], f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - reported to the driver, the grid goes on
        tail = "".join(traceback.format_exception(exc)[-TRACEBACK_LINES:]).strip()
        return JobOutcome(job, [], f"{type(exc).__name__}: {exc}\n{tail}",
                          time.perf_counter() - t0)
    return JobOutcome(job, rows, None, time.perf_counter() - t0)
