"""Expand a GridSpec into extract -> probe -> finetune jobs and drop the finished ones.

Method. Every (dataset, size, backbone) with a probe method gets an extract job; every
(store, subset, probe method) a probe job that depends on it (the seeds of fraction 1.0 in one
job, sharing a fit: they draw the same images); every (dataset, size, backbone,
subset) a finetune job when "finetune" is asked for. Done work is found before any model loads:
a store is done when a finished store carries the same request (as `extract` finds it); a probe
is done when the registry holds its `result_key` on that store (one query for the whole grid);
a finetune is done when `finetune_done` finds its row. "auto" choices resolve where the job runs,
so for them a row made under any of their resolutions counts as done: probe backend "auto" ->
any of cuml, torch, sklearn; device null -> cuda or cpu. A probe whose store is not built yet
is never done.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from medfm.errors import MedfmError, StoreError
from medfm.extract import request_json
from medfm.finetune import Recipe, resolve_recipe
from medfm.finetune import finetune_done
from medfm.grid.jobs import ExtractJob, FinetuneJob, Job, ProbeJob
from medfm.grid.spec import PROBE_METHODS, GridSpec
from medfm.paths import resolve_workdir
from medfm.probe.backends import BACKENDS
from medfm.probe.run import result_key
from medfm.store.features import FeatureStore, stores_dir
from medfm.store.registry import Registry

KINDS = ("extract", "probe", "finetune")  # job kinds, in dependency order


@dataclass(frozen=True)
class GridPlan:
    """The jobs a grid still has to run, and how many of each kind were already done."""

    spec: GridSpec
    workdir: str  # absolute
    jobs: tuple[Job, ...]  # to run; a ProbeJob depends on the ExtractJob in its `store`
    total: dict[str, int]  # kind -> jobs in the whole grid
    done: dict[str, int]  # kind -> jobs dropped as already finished

    def todo(self, kind: str) -> tuple[Job, ...]:
        return tuple(job for job in self.jobs if job.kind == kind)

    def describe(self) -> str:
        """A plain-text plan: the grid's axes, then per kind total / done / to run."""
        s = self.spec
        subsets = [f"fractions {','.join(f'{f:g}' for f in s.fractions)}"] if s.fractions else []
        subsets += [f"shots {','.join(map(str, s.shots))}"] if s.shots else []
        lines = [
            f"grid: {len(s.datasets)} dataset(s) x {len(s.sizes)} size(s) x "
            f"{len(s.backbones)} backbone(s) x {len(s.subsets)} subset(s) "
            f"({'; '.join(subsets)}; seeds {','.join(map(str, s.seeds))}); "
            f"methods {', '.join(s.methods)}",
            f"workdir: {self.workdir}",
            f"{'kind':<10}{'total':>8}{'done':>8}{'to run':>8}",
        ]
        for kind in KINDS:
            lines.append(f"{kind:<10}{self.total[kind]:>8}{self.done[kind]:>8}"
                         f"{self.total[kind] - self.done[kind]:>8}")
        n_total, n_done = sum(self.total.values()), sum(self.done.values())
        lines.append(f"{'all':<10}{n_total:>8}{n_done:>8}{n_total - n_done:>8}")
        lines += [f"  {job.label}" for job in self.jobs]
        return "\n".join(lines)


def _finished_stores(workdir: str) -> dict[str, FeatureStore]:
    """request JSON -> finished store, for every readable store in the work directory."""
    found = {}
    for path in sorted(stores_dir(workdir).glob("*.h5")):
        try:
            store = FeatureStore(path)
        except StoreError:
            continue  # a corrupt store: its extract job rebuilds it or reports why
        if "request_json" in store.attrs:
            found[store.attrs["request_json"]] = store
    return found


def _probe_backends(backend: str) -> tuple[str, ...]:
    """The backends whose rows satisfy a probe asked for with `backend`."""
    return tuple(b for b in BACKENDS if b != "auto") if backend == "auto" else (backend,)


def _device_types(device: str | None) -> tuple[str, ...]:
    """The device types whose rows satisfy a finetune asked for on `device`."""
    if device is None:
        return ("cuda", "cpu")
    try:
        return (torch.device(device).type,)
    except RuntimeError:
        return ()  # the jobs themselves fail and say which devices are valid


def _finetune_finished(registry: Registry, job: FinetuneJob, recipe: Recipe,
                       device_types: tuple[str, ...]) -> bool:
    try:
        return any(finetune_done(registry, dataset=job.dataset, size=job.size,
                                 backbone=job.backbone, spec=job.spec, recipe=recipe,
                                 weights=job.weights, device_type=device_type)
                   for device_type in device_types)
    except MedfmError:
        return False  # e.g. an unknown backbone: the job itself fails and reports why


def plan_grid(spec: GridSpec, *, workdir: str | os.PathLike | None = None) -> GridPlan:
    """Every job of `spec`, minus those already finished in `workdir` (see module docstring)."""
    root = str(Path(resolve_workdir(workdir)).resolve())
    registry = Registry.in_workdir(root)
    stores = _finished_stores(root)
    probe_methods = [m for m in spec.methods if m in PROBE_METHODS]
    total: Counter = Counter()
    done: Counter = Counter()
    jobs: list[Job] = []

    extracts = []
    if probe_methods:
        for dataset in spec.datasets:
            for size in spec.sizes:
                for backbone in spec.backbones:
                    job = ExtractJob(dataset, size, backbone, spec.weights, spec.resize_policy,
                                     spec.input_size, spec.dtype, spec.device, spec.data_root,
                                     root)
                    request = request_json(dataset, size, backbone, spec.weights,
                                            spec.resize_policy, spec.input_size, spec.dtype)
                    extracts.append((job, stores.get(request)))
    candidates = {}  # (store path, method, subset) -> digests of the keys that satisfy it
    for _, store in extracts:
        for method in probe_methods if store is not None else ():
            for subset in spec.subsets:
                candidates[store.path, method, subset] = {
                    result_key(store, subset, method=method, backend=backend,
                               selection=spec.selection).digest()
                    for backend in _probe_backends(spec.backend)
                }
    finished = registry.done_keys({d for digests in candidates.values() for d in digests})
    for job, store in extracts:
        total["extract"] += 1
        if store is not None:
            done["extract"] += 1
        else:
            jobs.append(job)
        for method in probe_methods:
            pending = []
            for subset in spec.subsets:
                total["probe"] += 1
                if store is not None and candidates[store.path, method, subset] & finished:
                    done["probe"] += 1
                else:
                    pending.append(subset)
            full = [s for s in pending if s.fraction == 1.0]  # every seed draws the same images
            groups = [(s,) for s in pending if s.fraction != 1.0] + ([tuple(full)] if full else [])
            jobs += [ProbeJob(job, group, method, spec.backend, spec.selection) for group in groups]

    if "finetune" in spec.methods:
        recipe = resolve_recipe(spec.recipe, **dict(spec.overrides))
        device_types = _device_types(spec.device)
        for dataset in spec.datasets:
            for size in spec.sizes:
                for backbone in spec.backbones:
                    for subset in spec.subsets:
                        job = FinetuneJob(dataset, size, backbone, spec.weights, subset,
                                          spec.recipe, spec.overrides, spec.device,
                                          spec.data_root, root)
                        total["finetune"] += 1
                        if _finetune_finished(registry, job, recipe, device_types):
                            done["finetune"] += 1
                        else:
                            jobs.append(job)
    return GridPlan(spec=spec, workdir=root, jobs=tuple(jobs),
                    total={k: total[k] for k in KINDS}, done={k: done[k] for k in KINDS})
