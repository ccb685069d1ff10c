"""`local` (default): spawned process pools on this machine.

Workers (`worker_plan`). Without GPUs: `max_workers` workers (default: one per core) sharing the
cores' threads. With GPUs and no `max_workers`: one worker per visible GPU, pinned to it with
CUDA_VISIBLE_DEVICES, for the jobs that compute on a GPU (extraction, fine-tuning, GPU probes:
grid.executors.needs_gpu), and beside them a pool of CPU workers (one per remaining core, no
GPU visible) for the jobs that do not, so CPU probes fit while the GPU extracts. With GPUs and
`max_workers`: that many workers, pinned to the GPUs in turn, for every job. Each pool starts
when its first job comes. Spawned, so no CUDA or thread state is inherited.

Small stores keep a GPU busy. A worker keeps its last extraction model loaded (medfm.extract),
and extraction jobs are handed out grouped by backbone, so one model load (and fold check and
compilation) serves every dataset and size of that backbone in a row; `jobs_per_gpu` N gives each
GPU N workers, so one job's host work (reading the npz, writing the store, loading the next
model) overlaps another's kernels.

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

from medfm.grid.executors import failed, needs_gpu, register
from medfm.grid.jobs import Job, JobOutcome, run_job
from medfm.limits import WORKERS_MAX, check_at_most
from medfm.runtime import cuda_available


def _gpu_count() -> int:
    if not cuda_available():
        return 0
    import torch  # only where a GPU is seen

    return torch.cuda.device_count()


@dataclass(frozen=True)
class WorkerPlan:
    """The local executor's workers: GPU-pinned ones and GPU-less ones, and torch threads."""

    gpu_devices: tuple[str, ...]  # CUDA_VISIBLE_DEVICES of each GPU worker (empty: none)
    cpu_workers: int  # workers that see no GPU (CUDA_VISIBLE_DEVICES="" where GPUs exist)
    threads: int  # torch CPU threads per job

    def pool_for(self, gpu_job: bool) -> str:
        """"gpu" or "cpu": the pool a job goes to (the only one there is, if one)."""
        if not self.cpu_workers:
            return "gpu"
        return "gpu" if gpu_job and self.gpu_devices else "cpu"


def worker_plan(*, gpus: int, cores: int, max_workers: int | None,
                visible: str | None, jobs_per_gpu: int = 1) -> WorkerPlan:
    """Workers for `gpus` visible GPUs (`visible`: the driver's CUDA_VISIBLE_DEVICES) and
    `cores` usable cores, `jobs_per_gpu` GPU workers per GPU (module docstring)."""
    if max_workers is not None:
        devices = tuple(gpu_assignments(max_workers, gpus, visible)) if gpus else ()
        return WorkerPlan(devices, 0 if gpus else max_workers, max(1, cores // max_workers))
    if not gpus:
        return WorkerPlan((), cores, 1)
    gpu_workers = gpus * jobs_per_gpu
    cpu_workers = max(1, cores - gpu_workers)
    return WorkerPlan(tuple(gpu_assignments(gpu_workers, gpus, visible)), cpu_workers,
                      max(1, cores // (gpu_workers + cpu_workers)))


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


def _init_worker(gpu_queue, driver_pid: int, hide_gpus: bool = False) -> None:
    """Tie this worker's life to the driver's; pin it to one GPU (if any were handed out), or
    hide every GPU from it (a CPU worker beside GPU ones), before anything imports torch."""
    _die_with(driver_pid)
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())
    elif hide_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


MAX_JOBS_PER_GPU = 8  # --jobs-per-gpu bound: more only splits a GPU's memory finer


def by_model(jobs: Sequence[Job]) -> list[Job]:
    """`jobs` with the extraction jobs first, grouped by backbone (in their first order), the
    others after them in their order: a worker then extracts one backbone's stores in a row,
    with the model it keeps loaded."""
    extracts = [job for job in jobs if job.kind == "extract"]
    first = {}
    for job in extracts:
        first.setdefault(job.request.backbone, len(first))
    return ([*sorted(extracts, key=lambda job: first[job.request.backbone])]
            + [job for job in jobs if job.kind != "extract"])


@register
class LocalExecutor:
    """Spawned process pools on this machine: GPU-pinned workers and CPU workers beside them
    (module docstring)."""

    name = "local"

    @dataclass(frozen=True)
    class Options:
        max_workers: int | None = field(default=None, metadata={
            "type": int, "help": "local: worker processes (default: one per GPU plus one per "
                                 "other core for CPU jobs; without GPUs one per core)"})
        jobs_per_gpu: int = field(default=1, metadata={
            "type": int, "help": "local: GPU jobs running side by side on each GPU (default 1; "
                                 "2 keeps a GPU busy between small stores where memory allows)"})

    def __init__(self, *, workdir=None, **options) -> None:
        options = self.Options(**options)
        if options.max_workers is not None:
            check_at_most(options.max_workers, WORKERS_MAX, "--max-workers", minimum=1)
        check_at_most(options.jobs_per_gpu, MAX_JOBS_PER_GPU, "--jobs-per-gpu", minimum=1)
        self.max_workers = options.max_workers
        self.jobs_per_gpu = options.jobs_per_gpu
        self.workers: WorkerPlan | None = None  # decided when the first jobs come
        self._pools: dict[str, ProcessPoolExecutor] = {}  # "gpu"/"cpu", kept across waves

    def _pool(self, kind: str) -> ProcessPoolExecutor:
        """The pool `kind`, started on first use."""
        if kind not in self._pools:
            ctx = multiprocessing.get_context("spawn")
            plan = self.workers
            gpu_queue = None
            if kind == "gpu":
                gpu_queue = ctx.Queue()
                for device in plan.gpu_devices:
                    gpu_queue.put(device)
            workers = len(plan.gpu_devices) if kind == "gpu" else plan.cpu_workers
            self._pools[kind] = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker,
                initargs=(gpu_queue, os.getpid(), bool(plan.gpu_devices)))
        return self._pools[kind]

    def close(self) -> None:
        """Stop the worker processes (jobs not started yet are dropped)."""
        for pool in self._pools.values():
            pool.shutdown(cancel_futures=True)
        self._pools = {}

    def run(self, jobs: Sequence[Job]) -> Iterator[JobOutcome]:
        if not jobs:
            return
        if self.workers is None:
            self.workers = worker_plan(gpus=_gpu_count(), cores=len(os.sched_getaffinity(0)),
                                       max_workers=self.max_workers,
                                       visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
                                       jobs_per_gpu=self.jobs_per_gpu)
        plan = self.workers
        futures = {self._pool(plan.pool_for(needs_gpu(job))).submit(run_job, job, plan.threads):
                   job for job in by_model(jobs)}
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
