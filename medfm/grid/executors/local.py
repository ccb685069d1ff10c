"""`local` (default): a spawned process pool on this machine.

One worker per visible GPU, each pinned with CUDA_VISIBLE_DEVICES, or on CPU `max_workers`
workers (default: one per core) sharing the cores' threads. Spawned, so no CUDA or thread state
is inherited.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

from medfm.errors import InvalidArgumentError
from medfm.grid.executors import failed, register
from medfm.grid.jobs import Job, JobOutcome, run_job


def _gpu_count() -> int:
    from medfm.probe.solvers import cuda_available

    if not cuda_available():
        return 0
    import torch

    return torch.cuda.device_count()


def _init_worker(gpu_queue) -> None:
    """Pin this worker to one GPU (if any were handed out)."""
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())


@register
class LocalExecutor:
    """A spawned process pool on this machine: one worker per GPU, else `max_workers` on CPU."""

    name = "local"

    @dataclass(frozen=True)
    class Options:
        max_workers: int | None = field(default=None, metadata={
            "type": int, "help": "local: worker processes (default: one per GPU, else per core)"})

    def __init__(self, *, workdir=None, **options) -> None:
        options = self.Options(**options)
        if options.max_workers is not None and options.max_workers < 1:
            raise InvalidArgumentError(f"--max-workers must be >= 1; got {options.max_workers}")
        self.max_workers = options.max_workers
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
                        outcome = failed(job, "local worker", exc)
                    yield outcome
        finally:  # the driver stopped listening (interrupted): drop what has not started
            for future in futures:
                future.cancel()
