"""`local` (default): a spawned process pool on this machine.

One worker per visible GPU, each pinned with CUDA_VISIBLE_DEVICES, or on CPU `max_workers`
workers (default: one per core) sharing the cores' threads. Spawned, so no CUDA or thread state
is inherited.

No orphans: a worker ends itself when its driver dies, by any signal, SIGKILL included. Each
worker asks the kernel for SIGKILL when its parent exits (Linux PR_SET_PDEATHSIG) and, as a
backstop on any POSIX system, watches its parent pid every ORPHAN_POLL_S seconds. Nothing is lost
by it: a killed extract resumes from its last chunk and a killed fine-tune from its last
checkpoint when the grid is rerun.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import threading
import time
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


def gpu_assignments(workers: int, gpus: int, visible: str | None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each worker: the driver's visible devices in turn
    (so with CUDA_VISIBLE_DEVICES=2,3 the workers get 2 and 3, not 0 and 1), else 0..gpus-1.
    Entries may be indices or GPU UUIDs; they are passed on as written."""
    ids = [part.strip() for part in (visible or "").split(",") if part.strip()]
    if not ids:
        ids = [str(i) for i in range(gpus)]
    ids = ids[:gpus] if gpus else ids
    return [ids[i % len(ids)] for i in range(workers)]


ORPHAN_POLL_S = 1.0  # how often a worker checks that its driver is alive
PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal this process gets when its parent dies


def _die_with(driver_pid: int) -> None:
    """End this process when `driver_pid` (its parent) dies: PR_SET_PDEATHSIG on Linux, and a
    daemon thread that polls the parent pid (reparenting means the driver is gone)."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    def watch() -> None:
        while os.getppid() == driver_pid:
            time.sleep(ORPHAN_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    if os.getppid() != driver_pid:  # the driver died before the watch began
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True, name="medfm-orphan-watch").start()


def _init_worker(gpu_queue, driver_pid: int) -> None:
    """Tie this worker's life to the driver's; pin it to one GPU (if any were handed out)."""
    _die_with(driver_pid)
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
            for device in gpu_assignments(workers, gpus, os.environ.get("CUDA_VISIBLE_DEVICES")):
                gpu_queue.put(device)
        return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(gpu_queue, os.getpid()))

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
