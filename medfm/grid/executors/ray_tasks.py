"""`ray`: Ray core tasks, one per job, on a running cluster or a local one started here.

GPU jobs ask for `gpus_per_job` GPUs when the cluster has any; every job asks for
`cpus_per_job` CPUs and runs with that many torch threads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from medfm.errors import InvalidArgumentError
from medfm.grid.executors import DIST_HINT, check_counts, failed, needs_gpu, register
from medfm.grid.jobs import Job, JobOutcome, run_job


@register
class RayExecutor:
    """Ray core tasks, one per job, on the cluster at `address` or a local one."""

    name = "ray"

    @dataclass(frozen=True)
    class Options:
        address: str | None = field(default=None, metadata={
            "type": str, "help": "ray: cluster address, e.g. auto (default: start a local one)"})
        gpus_per_job: float = field(default=1.0, metadata={
            "type": float, "help": "ray/slurm: GPUs per extract or fine-tune job"})
        cpus_per_job: float = field(default=1.0, metadata={
            "type": float, "help": "ray/slurm: CPUs (and torch threads) per job"})
        init_options: dict = field(default_factory=dict, metadata={
            "help": "ray: keyword arguments of ray.init for a local cluster (API only)"})

    def __init__(self, *, workdir=None, **options) -> None:
        self.options = self.Options(**options)
        check_counts(self.options, positive=("cpus_per_job",), nonnegative=("gpus_per_job",))

    def close(self) -> None:
        """Nothing to stop: the Ray cluster outlives the grid (ray.shutdown() ends a local one)."""

    def run(self, jobs: Sequence[Job]) -> Iterator[JobOutcome]:
        if not jobs:
            return
        try:
            import ray
        except ImportError as exc:
            raise InvalidArgumentError(f"the ray executor needs Ray; {DIST_HINT}") from exc
        o = self.options
        if not ray.is_initialized():
            ray.init(address=o.address, **o.init_options)
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(max_retries=0)(run_job)
        threads = max(1, int(o.cpus_per_job))
        pending = {}
        for job in jobs:
            gpus = o.gpus_per_job if has_gpus and needs_gpu(job) else 0
            ref = task.options(num_cpus=o.cpus_per_job, num_gpus=gpus).remote(job, threads)
            pending[ref] = job
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a worker died: report, go on
                    yield failed(job, "ray task", exc)
