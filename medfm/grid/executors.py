"""Executors: run grid jobs somewhere and stream their outcomes back to the driver.

Each executor has one method, `run(jobs) -> Iterator[JobOutcome]`, yielding outcomes in the order
jobs finish. They only move `run_job` and its small frozen job specs around; the math lives in
the jobs and the registry writes in the driver.

- `local` (default): a process pool (spawned, so no CUDA or thread state is inherited); one
  worker per visible GPU, each pinned with CUDA_VISIBLE_DEVICES, or on CPU `max_workers`
  workers (default: one per core) sharing the cores' threads.
- `ray`: Ray core tasks on a running cluster (`address`, e.g. "auto" or "ray://head:10001") or
  on a local one started here; GPU jobs ask for `gpus_per_job` GPUs when the cluster has any.
- `slurm`: submitit job arrays (`cluster=None` detects SLURM; "local" runs the same job array
  as local subprocesses, "debug" in this process) with GPU, CPU and time limits per array task.
Ray and submitit are optional extras (`pip install medfm[dist]`), imported only when used.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from medfm.errors import InvalidArgumentError
from medfm.grid.jobs import Job, JobOutcome, run_job

EXECUTORS = ("local", "ray", "slurm")
POLL_S = 1.0  # how often the slurm executor checks its array tasks
DEFAULT_TIMEOUT_MIN = 240  # slurm: wall-clock limit per array task
DEFAULT_CPUS_PER_JOB = 4  # slurm: CPUs per array task (data loading, sklearn probes)
DIST_HINT = "install the optional extras: pip install 'medfm[dist]'"


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _needs_gpu(job: Job) -> bool:
    """Extraction and fine-tuning run the backbone; probes fit on CPU unless a GPU backend."""
    return job.kind != "probe" or job.backend in ("torch", "cuml")


def _failed(job: Job, where: str, exc: BaseException) -> JobOutcome:
    return JobOutcome(job, [], f"{where}: {type(exc).__name__}: {exc}", 0.0)


def _init_worker(gpu_queue) -> None:
    """Pin this worker to one GPU (if any were handed out)."""
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())


class LocalExecutor:
    """A spawned process pool on this machine: one worker per GPU, else `max_workers` on CPU."""

    name = "local"

    def __init__(self, max_workers: int | None = None) -> None:
        if max_workers is not None and max_workers < 1:
            raise InvalidArgumentError(f"max_workers must be >= 1; got {max_workers}")
        self.max_workers = max_workers
        self._pool: ProcessPoolExecutor | None = None  # started on first use, kept across waves
        self._threads = 1  # torch threads per job: the cores shared by the workers

    def _start(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("spawn")
        gpus = _gpu_count()
        cores = len(os.sched_getaffinity(0))
        workers = self.max_workers or gpus or cores
        self._threads = max(1, cores // workers)
        gpu_queue = None
        if gpus:
            gpu_queue = ctx.Queue()
            for i in range(workers):
                gpu_queue.put(i % gpus)
        return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(gpu_queue,))

    def close(self) -> None:
        """Stop the worker processes (jobs not started yet are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def run(self, jobs: Sequence[Job]) -> Iterator[JobOutcome]:
        if not jobs:
            return
        if self._pool is None:
            self._pool = self._start()
        futures = {self._pool.submit(run_job, job, self._threads): job for job in jobs}
        try:
            while futures:
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = futures.pop(future)
                    try:
                        outcome = future.result()
                    except Exception as exc:  # noqa: BLE001 - a worker died: report, go on
                        outcome = _failed(job, "local worker", exc)
                    yield outcome
        finally:  # the driver stopped listening (interrupted): drop what has not started
            for future in futures:
                future.cancel()


class RayExecutor:
    """Ray core tasks, one per job, on the cluster at `address` or a local one."""

    name = "ray"

    def __init__(self, address: str | None = None, gpus_per_job: float = 1.0,
                 cpus_per_job: float = 1.0, **init_options) -> None:
        self.address = address
        self.gpus_per_job = gpus_per_job
        self.cpus_per_job = cpus_per_job
        self.init_options = init_options  # passed to ray.init, e.g. num_cpus=2

    def close(self) -> None:
        """Nothing to stop: the Ray cluster outlives the grid (ray.shutdown() ends a local one)."""

    def run(self, jobs: Sequence[Job]) -> Iterator[JobOutcome]:
        if not jobs:
            return
        try:
            import ray
        except ImportError as exc:
            raise InvalidArgumentError(f"the ray executor needs Ray; {DIST_HINT}") from exc
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_options)
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(max_retries=0)(run_job)
        threads = max(1, int(self.cpus_per_job))
        pending = {}
        for job in jobs:
            gpus = self.gpus_per_job if has_gpus and _needs_gpu(job) else 0
            ref = task.options(num_cpus=self.cpus_per_job, num_gpus=gpus).remote(job, threads)
            pending[ref] = job
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a worker died: report, go on
                    yield _failed(job, "ray task", exc)


class SlurmExecutor:
    """submitit job arrays: one array per wave of jobs, one task per job."""

    name = "slurm"

    def __init__(self, folder: str | os.PathLike, *, cluster: str | None = None,
                 partition: str | None = None, gpus_per_job: int = 1,
                 cpus_per_job: int = DEFAULT_CPUS_PER_JOB,
                 timeout_min: int = DEFAULT_TIMEOUT_MIN, array_parallelism: int | None = None,
                 poll_s: float = POLL_S) -> None:
        self.folder = Path(folder)
        self.cluster = cluster
        self.partition = partition
        self.gpus_per_job = gpus_per_job
        self.cpus_per_job = cpus_per_job
        self.timeout_min = timeout_min
        self.array_parallelism = array_parallelism
        self.poll_s = poll_s

    def _executor(self, gpus: int):
        try:
            import submitit
        except ImportError as exc:
            raise InvalidArgumentError(f"the slurm executor needs submitit; {DIST_HINT}") from exc
        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        params = {"timeout_min": self.timeout_min, "cpus_per_task": self.cpus_per_job,
                  "gpus_per_node": gpus}
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.array_parallelism:
            params["slurm_array_parallelism"] = self.array_parallelism
        executor.update_parameters(**params)
        return executor

    def close(self) -> None:
        """Nothing to stop: each array ends with its last task."""

    def run(self, jobs: Sequence[Job]) -> Iterator[JobOutcome]:
        if not jobs:
            return
        pending = {}
        gpu_jobs = [j for j in jobs if _needs_gpu(j)]
        cpu_jobs = [j for j in jobs if not _needs_gpu(j)]
        for group, gpus in ((gpu_jobs, self.gpus_per_job), (cpu_jobs, 0)):
            if group:
                array = self._executor(gpus).map_array(run_job, group,
                                                       [self.cpus_per_job] * len(group))
                pending.update(zip(array, group, strict=True))
        while pending:
            finished = [task for task in pending if task.done()]
            if not finished:
                time.sleep(self.poll_s)
            for task in finished:
                job = pending.pop(task)
                try:
                    yield task.result()
                except Exception as exc:  # noqa: BLE001 - a task died: report, go on
                    yield _failed(job, f"slurm task {task.job_id}", exc)


Executor = LocalExecutor | RayExecutor | SlurmExecutor


def make_executor(name: str, *, workdir: str | os.PathLike, **options) -> Executor:
    """The executor called `name` (EXECUTORS) with its options; slurm logs go to
    <workdir>/slurm unless `folder` is given."""
    if name == "local":
        return LocalExecutor(**options)
    if name == "ray":
        return RayExecutor(**options)
    if name == "slurm":
        options.setdefault("folder", Path(workdir) / "slurm")
        return SlurmExecutor(**options)
    raise InvalidArgumentError(f"unknown executor {name!r}; use one of {', '.join(EXECUTORS)}")
