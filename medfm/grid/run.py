"""The grid driver: plan, run the jobs on an executor in dependency waves, record every row.

    from medfm.grid import load_spec, run_grid
    result = run_grid(load_spec("examples/grid_demo.yaml"), executor="local")
    print(result.summary()); exit_code = 0 if result.ok else 1

    medfm grid examples/grid_demo.yaml --executor ray --dry-run

Waves. First every extract and finetune job, and every probe job whose store already exists;
then the probe jobs of the stores built in the first wave. A probe whose extraction failed is
reported as failed without running. The driver is the registry's only writer: it adds each
job's rows the moment the job's outcome arrives, so a driver killed mid-grid loses nothing that
finished, and a rerun (which plans again) recomputes nothing that finished.

Cost. Before running, the plan is priced from the throughput table (medfm.grid.estimate): the
dry run prints the estimate, and the summary of a run sets it against the job hours spent.
The driver adds every finished probe job to the probe figures (extraction and fine-tuning record
their own).
"""

from __future__ import annotations

from collections import Counter

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from medfm.errors import InvalidArgumentError
from medfm.throughput import record_grid_run
from medfm.grid.estimate import GridEstimate, actual_seconds, estimate_plan, record_probe_outcome
from medfm.grid.executors import Executor, make_executor
from medfm.grid.jobs import Job, JobOutcome
from medfm.grid.plan import GridPlan, plan_grid
from medfm.grid.spec import GridSpec
from medfm.limits import GRID_JOBS_MAX
from medfm.paths import resolve_workdir
from medfm.robust.score import record
from medfm.store.registry import Registry


@dataclass
class GridResult:
    """What a grid run did."""

    plan: GridPlan
    executor: str
    outcomes: list[JobOutcome] = field(default_factory=list)  # one per job run or refused
    rows_added: int = 0  # registry rows written by this run
    estimate: GridEstimate | None = None  # the plan's cost (None: it could not be priced)

    @property
    def failed(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> bool:
        """True when every job succeeded (the CLI exits non-zero otherwise)."""
        return not self.failed

    def summary(self) -> str:
        """Counts, then one line per failed job with its error."""
        done = sum(self.plan.done.values())
        lines = [f"grid on {self.executor}: {len(self.outcomes) - len(self.failed)} job(s) "
                 f"succeeded, {len(self.failed)} failed, {done} already done; "
                 f"{self.rows_added} result row(s) added", *self.plan.skipped]
        if self.estimate is not None and self.outcomes:
            lines.append(self.estimate.versus(actual_seconds(self.outcomes)))
        for outcome in self.failed:
            first, *rest = outcome.error.splitlines()
            lines.append(f"FAILED {outcome.job.label}: {first}")
            lines += [f"    {line}" for line in rest]
        return "\n".join(lines)


def _record(registry: Registry, outcome: JobOutcome, workdir: str) -> int:
    """Add an outcome's rows with their test scores, then (as `finetune` does) keep a recorded
    fine-tune's tested weights and drop its resumable state; returns how many rows were new."""
    from medfm.finetune import finish_checkpoint  # torch: only once there is a row to record

    added = 0
    for scored in outcome.rows:
        row, scores, y_true = scored
        if registry.add(row, scores=scores, y_true=y_true):
            added += 1
            record(registry, workdir, scored)  # a probe's corrupted evaluations and its state
        if outcome.job.kind == "finetune":
            finish_checkpoint(workdir, row.key)
    return added


def run_plan(plan: GridPlan, executor: Executor, *, progress: bool = True) -> GridResult:
    """Run `plan`'s jobs on `executor` in two waves (see the module docstring); the caller
    closes the executor."""
    registry = Registry.in_workdir(plan.workdir)
    result = GridResult(plan=plan, executor=executor.name)
    pending_extracts = {job for job in plan.todo("extract")}
    first: list[Job] = [*plan.todo("extract"), *plan.todo("finetune")]
    first += [j for j in plan.todo("probe") if j.store not in pending_extracts]
    waiting = [j for j in plan.todo("probe") if j.store in pending_extracts]
    bar = tqdm(total=len(plan.jobs), unit="job", disable=not progress, desc="grid")
    failed_extracts = set()

    def consume(jobs: list[Job]) -> None:
        for outcome in executor.run(jobs):
            result.rows_added += _record(registry, outcome, plan.workdir)
            record_probe_outcome(outcome)
            result.outcomes.append(outcome)
            if not outcome.ok:
                tqdm.write(f"FAILED {outcome.job.label} (its error is in the summary)")
                if outcome.job.kind == "extract":
                    failed_extracts.add(outcome.job)
            bar.update(1)

    try:
        consume(first)
        ready = [j for j in waiting if j.store not in failed_extracts]
        for job in waiting:
            if job.store in failed_extracts:
                result.outcomes.append(
                    JobOutcome(job, [], f"not run: its extraction failed ({job.store.label})", 0.0)
                )
                bar.update(1)
        consume(ready)
    finally:
        bar.close()
    return result


def _estimate(plan: GridPlan) -> GridEstimate | None:
    """The plan's cost, or None where pricing it fails: an estimate never stops a grid."""
    try:
        return estimate_plan(plan)
    except Exception as exc:  # noqa: BLE001 - reported, the grid goes on
        tqdm.write(f"medfm grid: no cost estimate ({type(exc).__name__}: {exc})")
        return None


def _record_cost(plan: GridPlan, result: GridResult) -> None:
    """The run's estimated and actual job seconds per stage, kept in the work directory for the
    report (medfm.throughput.record_grid_run); a run that priced nothing or ran nothing keeps
    nothing."""
    if result.estimate is None or not result.outcomes:
        return
    ran = Counter(o.job.kind for o in result.outcomes if o.ok)
    record_grid_run(plan.workdir, device=result.estimate.device,
                    estimated=result.estimate.seconds, actual=actual_seconds(result.outcomes),
                    jobs=dict(ran), failed=sum(not o.ok for o in result.outcomes))


def run_grid(
    spec: GridSpec,
    *,
    workdir: str | os.PathLike | None = None,
    executor: str | Executor = "local",
    dry_run: bool = False,
    progress: bool = True,
    yes: bool = False,
    on_plan: Callable[[GridPlan], None] | None = None,
    compile: bool = False,
    **executor_options: Any,
) -> GridResult:
    """Plan `spec` in `workdir` and run what is not done on `executor`: a name ("local", "ray",
    "slurm"; `executor_options` are its typed options, checked before anything is planned, and
    it is closed at the end) or an executor object (kept open, so one pool can serve several
    grids). `dry_run` plans only. `on_plan` is shown the plan before any job runs; a plan of
    more than GRID_JOBS_MAX jobs runs only with `yes`. `compile` runs extraction and
    fine-tuning torch.compile-d."""
    made = None  # an executor built here from its name (starts nothing until it runs jobs)
    if isinstance(executor, str):
        executor = made = make_executor(executor, workdir=resolve_workdir(workdir, create=False),
                                        **executor_options)
    plan = plan_grid(spec, workdir=workdir, compile=compile)
    estimate = _estimate(plan)
    if dry_run:
        return GridResult(plan=plan, executor=executor.name, estimate=estimate)
    if len(plan.jobs) > GRID_JOBS_MAX and not yes:
        raise InvalidArgumentError(
            f"the grid has {len(plan.jobs):,} jobs to run, above the {GRID_JOBS_MAX:,} that "
            "run without confirmation; check the plan with --dry-run, then pass --yes.")
    if on_plan is not None:
        on_plan(plan)
    try:
        result = run_plan(plan, executor, progress=progress)
        result.estimate = estimate
        _record_cost(plan, result)
        return result
    finally:
        if made is not None:
            made.close()
