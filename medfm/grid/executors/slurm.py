"""`slurm`: submitit job arrays, one array per wave of jobs and per resource shape.

`cluster=None` detects SLURM; "local" runs the same job array as local subprocesses, "debug" in
this process. GPU, CPU and time limits apply per array task; logs go to <workdir>/slurm.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medfm.errors import InvalidArgumentError
from medfm.grid.executors import DIST_HINT, check_counts, failed, needs_gpu, register
from medfm.grid.jobs import Job, JobOutcome, run_job


@register
class SlurmExecutor:
    """submitit job arrays: one array per wave of jobs, one task per job."""

    name = "slurm"

    @dataclass(frozen=True)
    class Options:
        partition: str | None = field(default=None, metadata={
            "type": str, "help": "slurm: partition"})
        gpus_per_job: int = field(default=1, metadata={
            "type": int, "help": "ray/slurm: GPUs per extract or fine-tune job"})
        cpus_per_job: int = field(default=4, metadata={
            "type": int, "help": "ray/slurm: CPUs (and torch threads) per job"})
        timeout_min: int = field(default=240, metadata={
            "type": int, "help": "slurm: time limit per job, minutes (default 240)"})
        array_parallelism: int | None = field(default=None, metadata={
            "type": int, "help": "slurm: array tasks running at once"})
        cluster: str | None = field(default=None, metadata={
            "type": str, "help": "slurm: submitit cluster (default: SLURM; local, debug)"})
        folder: str | None = field(default=None, metadata={
            "type": str, "help": "slurm: log folder (default: <workdir>/slurm)"})
        poll_s: float = field(default=1.0, metadata={
            "type": float, "help": "slurm: seconds between checks of the array tasks"})

    def __init__(self, *, workdir=None, **options) -> None:
        self.options = options = self.Options(**options)
        check_counts(options, positive=("cpus_per_job", "timeout_min", "array_parallelism",
                                        "poll_s"), nonnegative=("gpus_per_job",))
        self.folder = Path(options.folder or Path(workdir or ".") / "slurm")

    def _executor(self, gpus: int):
        try:
            import submitit
        except ImportError as exc:
            raise InvalidArgumentError(f"the slurm executor needs submitit; {DIST_HINT}") from exc
        o = self.options
        executor = submitit.AutoExecutor(folder=self.folder, cluster=o.cluster)
        params = {"timeout_min": o.timeout_min, "cpus_per_task": o.cpus_per_job,
                  "gpus_per_node": gpus}
        if o.partition:
            params["slurm_partition"] = o.partition
        if o.array_parallelism:
            params["slurm_array_parallelism"] = o.array_parallelism
        executor.update_parameters(**params)
        return executor

    def close(self) -> None:
        """Nothing to stop: each array ends with its last task."""

    def run(self, jobs: Sequence[Job]) -> Iterator[JobOutcome]:
        if not jobs:
            return
        o = self.options
        pending = {}
        gpu_jobs = [j for j in jobs if needs_gpu(j)]
        cpu_jobs = [j for j in jobs if not needs_gpu(j)]
        for group, gpus in ((gpu_jobs, o.gpus_per_job), (cpu_jobs, 0)):
            if group:
                array = self._executor(gpus).map_array(run_job, group,
                                                       [o.cpus_per_job] * len(group))
                pending.update(zip(array, group, strict=True))
        while pending:
            finished = [task for task in pending if task.done()]
            if not finished:
                time.sleep(o.poll_s)
            for task in finished:
                job = pending.pop(task)
                try:
                    yield task.result()
                except Exception as exc:  # noqa: BLE001 - a task died: report, go on
                    yield failed(job, f"slurm task {task.job_id}", exc)
