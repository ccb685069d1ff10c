"""`ray`: Ray core tasks, one per job, on a running cluster or a local one started here.

GPU jobs (grid.executors.needs_gpu) ask for `gpus_per_job` GPUs when the cluster has any; every
job asks for `cpus_per_job` CPUs and runs with that many torch threads.

Worker processes. Ray reuses a worker process for later tasks, and CUDA reads
CUDA_VISIBLE_DEVICES once per process: a GPU task in a worker that first ran a task without a
GPU (CUDA_VISIBLE_DEVICES="") would silently compute on the CPU, and a task in a worker that
first held GPU 0 would keep seeing it. So the two kinds are two remote functions: a GPU task
runs in a fresh worker that ends with it (max_calls=1: the GPU Ray assigned is the only one it
ever sees), and CPU tasks run in workers of their own runtime environment, started with no GPU
visible, which Ray never hands a GPU task.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from medfm.errors import InvalidArgumentError
from medfm.grid.executors import DIST_HINT, check_counts, failed, needs_gpu, register
from medfm.grid.jobs import Job, JobOutcome, run_job


def remote_functions(ray, *, cpus: float, gpus: float):
    """(GPU task, CPU task): `run_job` as two remote functions whose worker processes are
    never shared (module docstring)."""
    gpu_task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_calls=1, max_retries=0)(run_job)
    cpu_task = ray.remote(num_cpus=cpus, num_gpus=0, max_retries=0, runtime_env={
        "env_vars": {"CUDA_VISIBLE_DEVICES": ""}})(run_job)
    return gpu_task, cpu_task


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
        gpu_task, cpu_task = remote_functions(ray, cpus=o.cpus_per_job, gpus=o.gpus_per_job)
        threads = max(1, int(o.cpus_per_job))
        pending = {}
        for job in jobs:
            task = gpu_task if has_gpus and needs_gpu(job) else cpu_task
            pending[task.remote(job, threads)] = job
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a worker died: report, go on
                    yield failed(job, "ray task", exc)
