"""Where grid jobs run (issue 15 items 5 and 6): the local executor's GPU-pinned workers and the
CPU workers beside them, Ray tasks of the two kinds in worker processes they never share, and a
probe's device decided by the planner, so its rows do not depend on the executor.

Ray runs for real, a local cluster on loopback that declares one GPU (Ray assigns declared GPUs
like real ones: it sets each task's CUDA_VISIBLE_DEVICES and places it in a worker process).

Run: .venv/bin/python -m pytest tests/test_placement.py -q
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest

from medfm.errors import InvalidArgumentError
from medfm.grid import plan_grid, spec_from_dict
from medfm.grid.executors import needs_gpu
from medfm.grid.executors.local import LocalExecutor, by_model, worker_plan
from medfm.synthetic import write_synthetic_npz

GRID = {"datasets": ["breastmnist"], "sizes": [28], "backbones": ["test_resnet"],
        "weights": "random", "fractions": [0.5], "seeds": [0], "methods": ["logreg"],
        "resize_policy": "native"}


def test_one_gpu_gets_cpu_workers_beside_it():
    plan = worker_plan(gpus=1, cores=16, max_workers=None, visible=None)
    assert plan.gpu_devices == ("0",) and plan.cpu_workers == 15 and plan.threads == 1
    assert plan.pool_for(True) == "gpu" and plan.pool_for(False) == "cpu"
    two = worker_plan(gpus=2, cores=16, max_workers=None, visible="2,3")
    assert two.gpu_devices == ("2", "3") and two.cpu_workers == 14  # the driver's GPUs


def test_max_workers_and_cpu_only_hosts_keep_one_pool():
    assert worker_plan(gpus=1, cores=16, max_workers=4, visible=None) == (
        worker_plan(gpus=1, cores=16, max_workers=4, visible="0"))
    shared = worker_plan(gpus=1, cores=16, max_workers=4, visible=None)
    assert shared.gpu_devices == ("0",) * 4 and shared.cpu_workers == 0 and shared.threads == 4
    assert shared.pool_for(False) == "gpu"  # every job, pinned workers only
    cpu = worker_plan(gpus=0, cores=2, max_workers=None, visible=None)
    assert cpu.gpu_devices == () and cpu.cpu_workers == 2
    assert cpu.pool_for(True) == "cpu"  # a GPU job on a CPU host goes where it can


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement-data")
    write_synthetic_npz(root, "breastmnist", size=28, n=(32, 12, 16))
    return root


def test_the_planner_decides_a_probes_device(data_root, tmp_path):
    """auto on this CPU host: every probe job carries device cpu, so a CPU worker, a GPU-pinned
    one or a Ray task computes it the same way and records the same solver and device."""
    plan = plan_grid(spec_from_dict({**GRID, "data_root": str(data_root)}), workdir=tmp_path)
    extract, = plan.todo("extract")
    probes = plan.todo("probe")
    assert probes and {job.probe.device for job in probes} == {"cpu"}
    assert {job.probe.solver for job in probes} == {"auto"}  # sized per store by the job
    assert needs_gpu(extract) and not any(needs_gpu(job) for job in probes)
    asked = plan_grid(spec_from_dict({**GRID, "data_root": str(data_root), "device": "cpu"}),
                      workdir=tmp_path)
    assert not any(needs_gpu(job) for job in asked.jobs)  # an extraction on the CPU, as asked


@pytest.mark.gpu
def test_on_a_gpu_host_auto_probes_compute_on_the_gpu_from_any_worker(data_root, tmp_path):
    plan = plan_grid(spec_from_dict({**GRID, "data_root": str(data_root)}), workdir=tmp_path)
    assert {job.probe.device for job in plan.todo("probe")} == {"cuda"}
    assert all(needs_gpu(job) for job in plan.jobs)
    executor = LocalExecutor()
    try:
        outcomes = list(executor.run(list(plan.todo("extract"))))
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
        assert executor.workers.cpu_workers >= 1  # CPU workers beside the GPU one
    finally:
        executor.close()


@dataclass(frozen=True)
class WhereAmI:
    """A grid job that reports the process it ran in and the GPUs that process was shown."""

    kind: str  # "extract" (a GPU job) or "probe" (with a CPU probe request)
    n: int
    device: str | None = None

    @property
    def probe(self):
        from medfm.resolve.probe import resolve_probe

        return resolve_probe("logreg", device="cpu")

    @property
    def label(self) -> str:
        return f"{self.kind} {self.n}"

    def run(self):
        return [(os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"))]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="Ray is an optional extra (pip install 'medfm[dist]'), not installed")
def test_ray_gpu_and_cpu_tasks_never_share_a_worker_process():
    import ray
    from ray import cloudpickle

    from medfm.grid.executors.ray_tasks import RayExecutor

    import tests.test_placement as here

    cloudpickle.register_pickle_by_value(here)  # the workers need not import the tests
    jobs = [WhereAmI(kind, i) for i in range(4) for kind in ("probe", "extract")]
    try:
        executor = RayExecutor(init_options={"num_cpus": 2, "num_gpus": 1,
                                             "include_dashboard": False})
        outcomes = {o.job: o for o in executor.run(jobs)}
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(here)
    assert all(o.ok for o in outcomes.values()), [o.error for o in outcomes.values()]
    seen = {job: outcomes[job].rows[0] for job in jobs}
    gpu_pids = [pid for job, (pid, _) in seen.items() if job.kind == "extract"]
    cpu_pids = {pid for job, (pid, _) in seen.items() if job.kind == "probe"}
    assert len(set(gpu_pids)) == len(gpu_pids)  # a fresh process for every GPU task
    assert not cpu_pids & set(gpu_pids)  # never one a CPU task ran in
    assert {cuda for job, (_, cuda) in seen.items() if job.kind == "extract"} == {"0"}
    assert {cuda for job, (_, cuda) in seen.items() if job.kind == "probe"} == {""}


def test_jobs_per_gpu_gives_each_gpu_that_many_workers():
    one = worker_plan(gpus=1, cores=16, max_workers=None, visible=None, jobs_per_gpu=2)
    assert one.gpu_devices == ("0", "0") and one.cpu_workers == 14
    two = worker_plan(gpus=2, cores=16, max_workers=None, visible="2,3", jobs_per_gpu=2)
    assert sorted(two.gpu_devices) == ["2", "2", "3", "3"] and two.cpu_workers == 12
    with pytest.raises(InvalidArgumentError, match="--jobs-per-gpu"):
        LocalExecutor(jobs_per_gpu=0)


def test_extraction_jobs_go_out_grouped_by_backbone(tmp_path):
    """A worker keeps its last model loaded, so one backbone's stores are handed out in a row
    (the plan lists them dataset by dataset); other jobs keep their order after them."""
    for flag in ("breastmnist", "pneumoniamnist"):
        write_synthetic_npz(tmp_path, flag, size=28, n=(8, 4, 4))
    spec = spec_from_dict({**GRID, "datasets": ["breastmnist", "pneumoniamnist"],
                           "backbones": ["test_resnet", "test_vit"],
                           "data_root": str(tmp_path)})
    jobs = plan_grid(spec, workdir=tmp_path / "w").jobs
    planned = [j.request.backbone.arch for j in jobs if j.kind == "extract"]
    assert planned == ["test_resnet", "test_vit"] * 2
    ordered = by_model(jobs)
    assert [j.request.backbone.arch for j in ordered[:4]] == ["test_resnet"] * 2 + ["test_vit"] * 2
    assert ordered[4:] == [j for j in jobs if j.kind != "extract"]
    assert sorted(map(id, ordered)) == sorted(map(id, jobs))
