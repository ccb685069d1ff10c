"""What a grid will cost before it runs, and what it cost after: hours per stage on its device.

    from medfm.grid.estimate import estimate_plan
    estimate = estimate_plan(plan)
    print(estimate.line())   # estimate extract 0.04 h  probe 0.10 h  finetune 2.31 h  total ...

Method. Each job still to run is priced from the throughput table (medfm.throughput: measured
figures of this machine first, then the shipped ones, then FLOP-scaled ones) for its stage,
backbone, model input size, precision and the device it will run on:
- extract: the store's images (every split) at the figure's images/s, plus its fixed seconds;
- probe: feature values touched (feature width x (training subset + val + test per row)) at the
  probe figure's rate, plus its fixed seconds (a line fitted through the grid's past probe jobs);
- finetune: the training images the recipe plans (medfm.finetune.train.planned_work: every
  epoch, no early stop, so an upper bound when the recipe has patience) at the training rate,
  the validation and test passes at the evaluation rate, plus the fixed seconds. A device with no
  fine-tune figure at all uses its extraction figure, a training step costing 3 forward passes.
Hours are job hours, one job after another on one device; workers on separate GPUs divide the
wall time, while CPU workers share the cores, so there the wall time stays about the job hours
and each job, run beside others, takes longer than the figures say (the demo grid, 2 workers on 2
cores: fine-tunes at 77 img/s against 123 alone). A worker's first job also pays its imports
(torch, timm: ~3 s on 2 cores), which no figure holds. The dataset sizes are MedMNIST's (INFO),
or an imported dataset's card.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field, replace

from medfm.data import get_dataset
from medfm.grid.jobs import ExtractJob, FinetuneJob, Job, JobOutcome, ProbeJob
from medfm.grid.plan import KINDS, GridPlan
from medfm.runtime import device_name, device_type
from medfm.sampling import SubsetSpec
from medfm.store.features import FeatureStore, stores_dir
from medfm.throughput import (TRAIN_FLOPS_FACTOR, Measurement, forward_flops, lookup_throughput,
                              measured_figures, record_probe)

DEFAULT_DIM = 1024  # feature width assumed for a probe whose backbone timm cannot count


@functools.cache
def device_label(device: str | None) -> str:
    """The name a device's figures are filed under (medfm.runtime.device_name) for a job's
    device ("cpu", "cuda", "cuda:1"; None: CUDA when visible)."""
    import torch  # only to name the device, when a grid is priced

    kind = device_type(device)
    return device_name(torch.device(device if device and kind == "cuda" else kind))


def subset_size(spec: SubsetSpec, n_train: int, n_classes: int) -> int:
    """Training images of a subset, as the sampler draws them (near enough to price it)."""
    if spec.fraction is not None:
        return max(min(n_classes, n_train), round(spec.fraction * n_train))
    return 0 if spec.shots is None else min(n_train, spec.shots * n_classes)  # None: zero-shot


def probe_units(job: ProbeJob, dim: int) -> float:
    """Feature values a probe job touches: its training subset and the val split once, the test
    split once per row."""
    info = get_dataset(job.store.request.dataset.name)
    n = info.n_samples
    n_sub = max(subset_size(s, n["train"], info.n_classes) for s in job.specs)
    return float(dim * (n_sub + n["val"] + n["test"] * len(job.specs)))


def _finetune_figure(job: FinetuneJob, device: str, measured) -> Measurement | None:
    r = job.request
    precision = "bfloat16" if device_type(job.device) == "cuda" else "float32"
    figure = lookup_throughput("finetune", r.backbone.arch, r.preprocess.input_size, device,
                               precision, job.compile, measured=measured)
    if figure is not None:
        return figure
    forward = lookup_throughput("extract", r.backbone.arch, r.preprocess.input_size, device,
                                precision, job.compile, measured=measured)
    if forward is None:
        return None
    return replace(forward, stage="finetune", rate=forward.rate / TRAIN_FLOPS_FACTOR,
                   eval_rate=forward.rate,
                   source=f"{forward.source}, its extraction figure / {TRAIN_FLOPS_FACTOR:g}")


def price_job(job: Job, measured: list[Measurement]) -> tuple[float, Measurement | None]:
    """(estimated seconds, the figure used) of one job; (0, None) when nothing prices it."""
    from medfm.finetune.train import planned_work  # torch: only when a grid is priced

    if isinstance(job, ExtractJob):
        r = job.request
        figure = lookup_throughput("extract", r.backbone.arch, r.preprocess.input_size,
                                   device_label(job.device), r.precision, job.compile,
                                   measured=measured)
        images = sum(get_dataset(r.dataset.name).n_samples.values())
        return (figure.seconds(images), figure) if figure else (0.0, None)
    if isinstance(job, ProbeJob):
        figure = lookup_throughput("probe", job.probe.method, 0, device_label(job.probe.device),
                                   "float32", measured=measured)
        r = job.store.request
        counted = forward_flops(r.backbone.arch, r.preprocess.input_size)
        dim = counted[1] if counted else DEFAULT_DIM
        return (figure.seconds(probe_units(job, dim)), figure) if figure else (0.0, None)
    figure = _finetune_figure(job, device_label(job.device), measured)
    if figure is None:
        return 0.0, None
    info = get_dataset(job.request.dataset.name)
    n = info.n_samples
    train_images, rounds = planned_work(job.request.recipe,
                                        subset_size(job.request.spec, n["train"], info.n_classes))
    return figure.seconds(train_images, rounds * n["val"] + n["test"]), figure


@dataclass(frozen=True)
class GridEstimate:
    """Estimated job seconds per stage of a plan, and what the figures rest on."""

    device: str  # where the grid's extraction and fine-tuning run
    seconds: dict[str, float]  # stage -> estimated job seconds of the jobs to run
    figures: dict[str, dict[str, Measurement]] = field(default_factory=dict)  # stage ->
    #                                    "arch@size" -> the figure used
    unpriced: dict[str, int] = field(default_factory=dict)  # stage -> jobs without a figure

    def line(self) -> str:
        """`estimate extract <h> h  probe <h> h  finetune <h> h  total <h> h on <device>`."""
        stages = "  ".join(f"{k} {self.seconds[k] / 3600:.2f} h" for k in KINDS)
        return (f"estimate {stages}  total {sum(self.seconds.values()) / 3600:.2f} h "
                f"on {self.device}")

    def describe(self) -> list[str]:
        """The estimate line, then per stage which figures are measured and which estimated."""
        lines = [self.line()]
        for stage in KINDS:
            used = self.figures.get(stage, {})
            if not used and not self.unpriced.get(stage):
                continue
            kinds = Counter(f.kind for f in used.values())
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
            missing = (f"; {self.unpriced[stage]} job(s) without any figure (not counted)"
                       if self.unpriced.get(stage) else "")
            lines.append(f"  {stage} figures: {counts or 'none'}{missing}")
            lines += [f"    {name}: {_rate(f)} {f.source}" for name, f in sorted(used.items())]
        lines.append("  (job hours, one job at a time; workers on separate GPUs divide the wall "
                     "time, CPU workers share the cores; fine-tunes priced without early "
                     "stopping)")
        return lines

    def versus(self, actual: dict[str, float]) -> str:
        """One line: estimated vs actual job hours per stage (the jobs that ran)."""
        parts = []
        for stage in KINDS:
            est, got = self.seconds[stage], actual.get(stage, 0.0)
            if est == 0 and got == 0:
                continue
            gap = f" ({100 * (est - got) / got:+.0f}%)" if got > 0 else ""
            parts.append(f"{stage} {est / 3600:.3f} h vs {got / 3600:.3f} h{gap}")
        return "estimated vs actual job hours: " + ("  ".join(parts) or "nothing ran")


def _rate(figure: Measurement) -> str:
    unit = "values/s" if figure.stage == "probe" else "img/s"
    return f"{figure.rate:,.4g} {unit} + {figure.overhead_s:.1f} s/job,"


def estimate_plan(plan: GridPlan) -> GridEstimate:
    """Price every job of `plan` still to run (module docstring)."""
    measured = measured_figures()
    seconds: Counter = Counter({k: 0.0 for k in KINDS})
    figures: dict[str, dict[str, Measurement]] = {k: {} for k in KINDS}
    unpriced: Counter = Counter()
    for job in plan.jobs:
        cost, figure = price_job(job, measured)
        if figure is None:
            unpriced[job.kind] += 1
            continue
        seconds[job.kind] += cost
        name = (f"{figure.arch}@{figure.input_size}" if job.kind != "probe"
                else f"{figure.arch} on {figure.device}")
        figures[job.kind][name] = figure
    return GridEstimate(device=device_label(plan.spec.device), seconds=dict(seconds),
                        figures=figures, unpriced=dict(unpriced))


def actual_seconds(outcomes: list[JobOutcome]) -> dict[str, float]:
    """Job seconds per stage of the jobs that succeeded."""
    spent: Counter = Counter()
    for outcome in outcomes:
        if outcome.ok:
            spent[outcome.job.kind] += outcome.wall_s
    return dict(spent)


def record_probe_outcome(outcome: JobOutcome) -> None:
    """Add a finished probe job to the probe figures of its method and device (the grid driver
    calls this; probes record nothing themselves)."""
    job = outcome.job
    if not (outcome.ok and isinstance(job, ProbeJob)):
        return
    try:
        dim = FeatureStore(stores_dir(job.store.workdir) / job.store.request.filename()).dim
    except Exception:  # noqa: BLE001 - a figure is a cache: a store gone meanwhile costs it
        return
    record_probe(job.probe.method, device_label(job.probe.device), probe_units(job, dim),
                 outcome.wall_s)
