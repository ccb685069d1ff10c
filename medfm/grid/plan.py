"""Expand a GridSpec into extract -> probe -> finetune jobs and drop the finished ones.

Method. Every name in the spec is resolved first (medfm.resolve): datasets to their files
(a default dataset whose file is missing is skipped and named), backbones to their canonical
identity, preprocessing against each backbone's data config, probe methods to their settings,
the fine-tune recipe with its preprocessing (its overrides win over the grid's, which win over
the recipe's). Then every (dataset, size, backbone) with a probe method gets an extract job;
every (store, subset, probe method) a probe job that depends on it (the seeds of fraction 1.0 in
one job, sharing a fit: they draw the same images; its device, when the spec leaves it to medfm,
is the driver's: CUDA when it sees a GPU); every (dataset, size, backbone, subset) a
finetune job when "finetune" is asked for, and one more, its backbone frozen, for "head-probe".
A grid of a preset (GridSpec.preset) gives each backbone the preset's rules (input size, recipe
settings) in its extract and fine-tune jobs. Done work is found with no scan and no model: a
store is done when the file its request names exists (its header gives the fingerprint that
probe keys carry; a corrupt one is left to its extract job, which reports it), and every probe
and fine-tune key of the grid is looked up in the registry in one query. A probe whose store is
not built yet is never done. Planning costs one stat and, for finished stores, one header read
per store, whatever the size of the registry.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from medfm.backbones.names import resolve_backbone
from medfm.data import resolve_datasets
from medfm.grid.jobs import ExtractJob, FinetuneJob, Job, ProbeJob
from medfm.grid.spec import HEAD_PROBE, TRAINED, GridSpec
from medfm.paths import resolve_workdir
from medfm.resolve.finetune import resolve_finetunes
from medfm.resolve.keys import STORES_DIRNAME
from medfm.resolve.methods import get_method_spec
from medfm.resolve.store import resolve_store_request
from medfm.runtime import device_type
from medfm.sampling import NoSubset
from medfm.store.features import stores_dir
from medfm.store.done import finished_keys, finished_store

KINDS = ("extract", "probe", "finetune")  # job kinds, in dependency order


@dataclass(frozen=True)
class GridPlan:
    """The jobs a grid still has to run, and how many of each kind were already done."""

    spec: GridSpec
    workdir: str  # absolute
    jobs: tuple[Job, ...]  # to run; a ProbeJob depends on the ExtractJob in its `store`
    total: dict[str, int]  # kind -> jobs in the whole grid
    done: dict[str, int]  # kind -> jobs dropped as already finished
    skipped: tuple[str, ...] = ()  # default datasets without a file, one line each

    def todo(self, kind: str) -> tuple[Job, ...]:
        return tuple(job for job in self.jobs if job.kind == kind)

    def describe(self) -> str:
        """A plain-text plan: the grid's axes, then per kind total / done / to run."""
        s = self.spec
        subsets = [f"fractions {','.join(f'{f:g}' for f in s.fractions)}"] if s.fractions else []
        subsets += [f"shots {','.join(map(str, s.shots))}"] if s.shots else []
        datasets = (f"{len(s.datasets)} dataset(s)" if s.datasets is not None
                    else "every dataset with a file")
        lines = [
            f"grid: {datasets} x {len(s.sizes)} size(s) x "
            f"{len(s.backbones)} backbone(s) x {len(s.subsets)} subset(s) "
            f"({'; '.join(subsets)}; seeds {','.join(map(str, s.seeds))}); "
            f"methods {', '.join(s.methods)}",
            f"workdir: {self.workdir}",
            *self.skipped,
            f"{'kind':<10}{'total':>8}{'done':>8}{'to run':>8}",
        ]
        for kind in KINDS:
            lines.append(f"{kind:<10}{self.total[kind]:>8}{self.done[kind]:>8}"
                         f"{self.total[kind] - self.done[kind]:>8}")
        n_total, n_done = sum(self.total.values()), sum(self.done.values())
        lines.append(f"{'all':<10}{n_total:>8}{n_done:>8}{n_total - n_done:>8}")
        lines += [f"  {job.label}" for job in self.jobs]
        return "\n".join(lines)


def _resolve(spec: GridSpec, data_root):
    """(dataset refs, skipped lines, backbone refs in spec order): every name, resolved once."""
    refs, skipped = resolve_datasets(spec.datasets, spec.sizes, data_root)
    # two spellings of one model (an alias, arch, arch.tag) are one backbone: one job per run
    backbones = list(dict.fromkeys(resolve_backbone(name, spec.weights)
                                   for name in spec.backbones))
    return refs, skipped, backbones


def _extract_jobs(spec: GridSpec, refs, backbones, root: str, compile: bool):
    """[(ExtractJob, finished store or None)] for every dataset file x backbone."""
    stores = Path(root) / STORES_DIRNAME
    if stores.exists():  # (a file there: stores_dir says so)
        stores_dir(root)  # upgrades stores of an older layout, so their names are found
    found = []
    for ref in refs:
        for backbone in backbones:
            request = resolve_store_request(dataset=ref, backbone=backbone,
                                            preprocess=spec.preprocess_for(backbone),
                                            dtype=spec.dtype, device=spec.device,
                                            precision=spec.precision)
            found.append((ExtractJob(request, spec.device, root, compile),
                          finished_store(stores / request.filename())))
    return found


def _finetune_jobs(spec: GridSpec, refs, backbones, root: str,
                   compile: bool) -> list[FinetuneJob]:
    """Every fine-tune (and head-probe: the head through the frozen backbone) job, resolved by
    the one path the CLI and the API take (medfm.resolve.finetune.resolve_finetunes)."""
    jobs = []
    for method in (m for m in TRAINED if m in spec.methods):
        requests = resolve_finetunes(
            datasets=refs, backbones=backbones, subsets=spec.subsets, recipe=spec.recipe,
            overrides=dict(spec.overrides), preprocess=spec.preprocess, weights=spec.weights,
            preset=spec.preset, frozen=method == HEAD_PROBE)
        jobs += [FinetuneJob(request, spec.device, root, compile) for request in requests]
    return jobs


def _probe_jobs(extract: ExtractJob, probe, subsets, digests: list[str] | None,
                finished: set[str]) -> tuple[list[ProbeJob], int]:
    """(jobs still to run, subsets already done) of one probe method on one store; `digests`
    are the subsets' keys (None: the store is not built, nothing can be done)."""
    pending = [s for i, s in enumerate(subsets)
               if digests is None or digests[i] not in finished]
    full = [s for s in pending if s.fraction == 1.0]  # every seed draws the same images
    groups = [(s,) for s in pending if s.fraction != 1.0] + ([tuple(full)] if full else [])
    return [ProbeJob(extract, group, probe) for group in groups], len(subsets) - len(pending)


def _subsets_of(probe, spec: GridSpec) -> tuple:
    """The grid's subsets for a probe method; a method that trains on nothing (zero-shot) runs
    once per store, with no subset."""
    return spec.subsets if get_method_spec(probe.method).trains else (NoSubset(),)


def _check_weights_file(backbones, jobs: list[Job]) -> None:
    """A weights file the grid's models load is read once now (WeightsError, one line, before
    any job runs), not found unreadable by every extract and fine-tune job."""
    if any(job.kind in ("extract", "finetune") for job in jobs):
        from medfm.backbones.create import read_checkpoint  # torch: only with a weights file

        for path in dict.fromkeys(b.path for b in backbones if b.path is not None):
            read_checkpoint(Path(path))


def plan_grid(spec: GridSpec, *, workdir: str | os.PathLike | None = None,
              compile: bool = False) -> GridPlan:
    """Every job of `spec`, minus those already finished in `workdir` (see module docstring).
    `compile`: extraction and fine-tune jobs run their model torch.compile-d (not in any key)."""
    root = str(Path(resolve_workdir(workdir, create=False)).resolve())  # planning writes nothing
    refs, skipped, backbones = _resolve(spec, spec.data_root)
    # where a probe computes is decided here, by the driver, not by the worker that runs it:
    # its rows then say the same device and solver on any executor (a CPU worker beside a GPU
    # one, a Ray task given no GPU)
    probes = [replace(p, device=p.device or device_type(None)) for p in spec.probe_requests()]
    extracts = _extract_jobs(spec, refs, backbones, root, compile) if probes else []
    finetunes = _finetune_jobs(spec, refs, backbones, root, compile)
    subsets = [_subsets_of(p, spec) for p in probes]  # zero-shot: one run, no subset
    probe_digests = {(i, j): [p.key(store, s).digest() for s in subsets[j]]
                     for i, (_, store) in enumerate(extracts) if store is not None
                     for j, p in enumerate(probes)}  # each key built once
    finetune_digests = [job.request.key().digest() for job in finetunes]
    finished = finished_keys(
        root, [d for digests in probe_digests.values() for d in digests] + finetune_digests)

    total, done, jobs = Counter(), Counter(), []
    for i, (extract, store) in enumerate(extracts):
        total["extract"] += 1
        if store is None:
            jobs.append(extract)
        else:
            done["extract"] += 1
        for j, probe in enumerate(probes):
            todo, n_done = _probe_jobs(extract, probe, subsets[j], probe_digests.get((i, j)),
                                       finished)
            total["probe"] += len(subsets[j])
            done["probe"] += n_done
            jobs += todo
    for job, digest in zip(finetunes, finetune_digests, strict=True):
        total["finetune"] += 1
        if digest in finished:
            done["finetune"] += 1
        else:
            jobs.append(job)
    _check_weights_file(backbones, jobs)
    return GridPlan(spec=spec, workdir=root, jobs=tuple(jobs),
                    total={k: total[k] for k in KINDS}, done={k: done[k] for k in KINDS},
                    skipped=tuple(skipped))
