"""The probe stage: probes fitted on feature stores, over fractions or shots x seeds, one registry
row per run.

    from medfm.probe import probe
    report = probe(dataset="breastmnist", fractions=[0.1, 0.3, 1.0], seeds=[0, 1, 2])
    report.computed, report.skipped, report.wall_s

    medfm probe --dataset breastmnist --fractions 0.1,0.3,1.0 --seeds 0,1,2

Order of work. `probe` resolves the probe request (`resolve_probe`: method, its settings, the
model-selection rule; medfm.probe.methods), finds every matching store by name, builds one key
per (store, subset) from the store's recorded request and content fingerprint
(medfm.resolve.keys.run_key), asks the registry in one query which are finished, and only then reads
features, each store's once, for the rest. Each run (`probe_job`, a pure job function that
writes nothing) draws its training subset with medfm.sampling, fits the method, scores the test
split and computes MedMNIST ACC/AUC, balanced accuracy and bootstrap CIs on the float32 scores
it returns; `probe` records the row with those per-sample test scores.
Runs whose training data and settings are identical (fraction 1.0 under several seeds with
val selection: the same images, the same deterministic fit) share one fit and one evaluation;
their rows say so in `extra["shared_fit"]`. A finished key is never rerun unless `force=True`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from medfm.backbones.names import resolve_backbone
from medfm.data import SPLITS, Task, get_dataset
from medfm.episodes import load_episodes, way_view
from medfm.errors import InvalidArgumentError, StoreError
from medfm.metrics import evaluate
from medfm.probe.methods import get_method
from medfm.probe.solvers import resolve_solver
from medfm.resolve.defaults import N_BOOTSTRAP, PROBE_METHOD, default_seeds
from medfm.resolve.keys import ResultKey
from medfm.resolve.presets import get_preset
from medfm.resolve.probe import ProbeRequest, resolve_probe
from medfm.robust.score import ScoredRun, load_state, record, save_state, score_pairs
from medfm.robust.stores import available_pairs
from medfm.runtime import versions
from medfm.sampling import (
    NoSubset,
    SubsetSpec,
    check_episodic,
    expand_episodes,
    expand_subsets,
    sample,
)
from medfm.store.done import finished_keys
from medfm.store.features import FeatureStore, find_stores
from medfm.store.registry import Registry, ResultRow

PROBE_VERSIONS = ("scikit-learn", "scipy", "torch", "h5py")  # recorded with every probe row


def for_work(request: ProbeRequest, stores_and_specs) -> ProbeRequest:
    """`request` with `auto` resolved once for the largest of these (store, subset) problems
    (medfm.probe.solvers.resolve_solver), so one call imports one solver."""
    if request.solver != "auto" or not get_method(request.method).uses_solver:
        return request
    work = max((_work(store, spec) for store, spec in stores_and_specs), default=0)
    return replace(request, solver=resolve_solver("auto", device=request.device, work=work))


def _work(store: FeatureStore, spec: SubsetSpec) -> int:
    """Rows x features x logits of the fit a subset asks for (its size before sampling)."""
    info = get_dataset(store.request["dataset"])
    rows = (spec.shots * info.n_classes if spec.shots is not None
            else round(spec.fraction * store.rows["train"]))
    logits = 1 if info.task is Task.BINARY else info.n_classes
    return min(rows, store.rows["train"]) * store.dim * logits


@dataclass(frozen=True)
class StoreArrays:
    """A store's features (float32) and labels for every split, read once."""

    features: dict  # split -> (N, D) float32: numpy, or a torch tensor on the device it was
    #                 loaded to
    labels: dict  # split -> (N, L) labels as in the npz
    targets: dict  # split -> labels shaped for fitting: (N,) class ids, or (N, L) multi-label

    @classmethod
    def load(cls, store: FeatureStore, device: str | None = None) -> StoreArrays:
        """Every split read once; with `device`, each split's features go there as stored
        (float16 through pinned memory, no float32 copy on the host) and are upcast there."""
        multi_label = get_dataset(store.request["dataset"]).task is Task.MULTI_LABEL
        labels = {s: store.labels(s) for s in SPLITS}
        targets = {s: y if multi_label else y[:, 0] for s, y in labels.items()}
        if device is None:
            return cls({s: store.features(s) for s in SPLITS}, labels, targets)
        import torch  # only when features go to a device: a host probe never imports it

        features = {}
        for split in SPLITS:
            as_stored = store.features(split, dtype=store.request["dtype"])  # no upcast here
            stored = torch.from_numpy(np.ascontiguousarray(as_stored))
            if torch.device(device).type == "cuda":
                stored = stored.pin_memory()
            features[split] = stored.to(device, non_blocking=True).float()
        return cls(features, labels, targets)


@dataclass(frozen=True)
class ProbeReport:
    """What one `probe` call did."""

    computed: list  # ResultRow of each run fitted now and recorded by this call
    skipped: list  # ResultKey of each planned run already in the registry (also one another
    #                process recorded first while this call fitted it: its row is kept)
    wall_s: float  # seconds for the whole call
    corrupted_filled: int = 0  # corrupted-split evaluations added to runs recorded before

    @property
    def planned(self) -> int:
        return len(self.computed) + len(self.skipped)


def _check_classes(arrays: StoreArrays, task: Task, n_classes: int) -> None:
    """Every class must be in the store's train split (the sampler keeps >= 1 of each)."""
    if task is Task.MULTI_LABEL:
        return
    present = np.unique(arrays.targets["train"])
    if not np.array_equal(present, np.arange(n_classes)):
        raise StoreError(f"the store's training split holds classes {present.tolist()}, not all "
                         f"{n_classes}; rebuild the store from the full train split.")


def probe_job(store: FeatureStore, *, spec: SubsetSpec, probe: ProbeRequest,
              arrays: StoreArrays | None = None, shared_fits: dict | None = None,
              corrupted: dict | None = None) -> ScoredRun:
    """One probe run, writing nothing: sample the training subset, fit, score the test split
    and every corrupted test split of the store (medfm.robust.score).

    Returns a ScoredRun: it unpacks as (row, float32 test scores, test labels), what
    `Registry.add` records, and carries the corrupted evaluations and the fitted state to keep.
    `arrays` passes features already read; `shared_fits` (a dict the caller keeps) lets runs
    with identical training data and settings share one fit and its evaluation; `corrupted`
    passes the store's corrupted splits already found (available_pairs).
    """
    start = time.perf_counter()
    key = probe.key(store, spec)
    method = get_method(probe.method)
    info = get_dataset(key.dataset)
    arrays = arrays or StoreArrays.load(store)
    subset = sample(arrays.labels["train"], info.task, spec)
    task, n_classes, train_rows = info.task, info.n_classes, subset.indices
    if spec.ways is not None:  # a W-way episode: fitted and scored on its classes only

        view = way_view(arrays, subset.indices, info.task)
        arrays, task, n_classes, train_rows = view.arrays, view.task, view.n_classes, \
            view.train_rows
        corrupted = {}
    fit_id = (store.fingerprint, subset.digest, probe.method, probe.params, probe.selection,
              spec.seed if method.seed_changes_fit(probe.selection) else None)
    if shared_fits is not None and fit_id in shared_fits:
        fitted, metrics, first = shared_fits[fit_id]
        extra = {**fitted.extra, "shared_fit": first}
    else:
        _check_classes(arrays, task, n_classes)
        fitted = method.fit(arrays.features, arrays.targets, task, train_rows,
                            params=json.loads(probe.params), selection=probe.selection,
                            seed=spec.seed, solver=probe.solver, device=probe.device,
                            **({} if method.trains else {"store": store}))
        metrics = evaluate(arrays.labels["test"], fitted.scores, task,
                           n_bootstrap=N_BOOTSTRAP, seed=0, device=probe.metrics_device())
        if shared_fits is not None:
            shared_fits[fit_id] = (fitted, metrics, key.digest())
        extra = fitted.extra
    if corrupted is None:
        corrupted = available_pairs(store)
    evaluations = (score_pairs(fitted.model, store, corrupted, task, arrays.labels["test"],
                               device=probe.metrics_device())
                   if corrupted and fitted.model is not None else [])
    state = (method.save_state(fitted.model)
             if method.save_state is not None and fitted.model is not None else None)
    row = ResultRow.scored(
        key, subset, metrics, chosen_C=fitted.chosen_C, solver=fitted.solver,
        device=fitted.device, weights_digest=store.weights_digest,
        extra=extra, versions=versions(*PROBE_VERSIONS), wall_s=time.perf_counter() - start)
    return ScoredRun(row, fitted.scores, arrays.labels["test"], evaluations, state)


def fill_corrupted(store: FeatureStore, spec: SubsetSpec, probe: ProbeRequest, key: ResultKey,
                   missing: dict, *, workdir, arrays: StoreArrays | None = None) -> tuple:
    """Score a recorded run on corrupted splits it lacks (`missing`: pair -> sibling store):
    from its kept state when there is one, else by refitting it once (same subset, same
    deterministic fit; its row is not touched). Returns (evaluations, state to keep or None
    when it was loaded)."""
    method = get_method(probe.method)
    info = get_dataset(key.dataset)
    state = load_state(workdir, key.digest()) if method.load_state is not None else None
    if state is not None:
        y_test = store.labels("test")
        return score_pairs(method.load_state(state), store, missing, info.task, y_test), None
    scored = probe_job(store, spec=spec, probe=probe, arrays=arrays, corrupted=missing)
    return scored.evaluations, scored.state


def matching_stores(*, dataset: str | None = None, backbone: str | None = None,
                    size: int | None = None, store: str | os.PathLike | None = None,
                    workdir: str | os.PathLike | None = None) -> list[FeatureStore]:
    """The stores a probe call covers: one by path, or every store matching the filters."""
    if store is not None:
        return [FeatureStore(store)]
    flag = get_dataset(dataset).flag if dataset else None
    found = find_stores(workdir, dataset=flag, backbone=backbone, size=size)
    if not found:
        wanted = " ".join(f"--{name} {value}" for name, value in
                          (("dataset", dataset), ("backbone", backbone), ("size", size)) if value)
        raise StoreError(f"no feature store matches {wanted or 'anything'} in the work directory; "
                         f"run `medfm extract {wanted}` first.")
    return found


def probe(*, dataset: str | None = None, backbone: str | None = None, size: int | None = None,
          store: str | os.PathLike | None = None, fractions: Sequence[float] | None = None,
          shots: Sequence[int] | None = None, seeds: Sequence[int] | None = None,
          method: str = PROBE_METHOD, selection: str | None = None, solver: str = "auto",
          device: str | None = None, workdir: str | os.PathLike | None = None,
          force: bool = False, progress: bool = True, sampler: str | None = None,
          preset: str | None = None, episodes: int | None = None, ways: int | None = None,
          episode_file: str | os.PathLike | None = None, **options) -> ProbeReport:
    """Probe every matching store at every fraction/shots x seed; skip runs already recorded.

    `options` are the method's own (e.g. `knn_metric="euclidean"`); `backbone` matches in any
    spelling (alias, bare architecture, arch.tag). `sampler` draws the subsets
    (medfm.sampling.SAMPLERS; None: the default). `preset` (medfm.resolve.presets) runs the probe as
    that preset's grid does: its method options, sampler, seeds and subsets (where not given),
    on the stores extracted as it extracts them (another store is an error).
    `episodes` draws that many few-shot episodes per shot count and seed (`ways`: of that many
    classes each), `episode_file` evaluates on the episodes of a file (medfm.episodes); a
    method that does not train (zero-shot) runs once per store, with no training subset.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if preset is not None:
        options, defaults = _preset_probe(preset, method, options, sampler)
        sampler = defaults.sampler
        seeds = defaults.seeds if seeds is None else seeds
        if not fractions and not shots:
            fractions, shots = defaults.fractions, defaults.shots
    seeds = default_seeds("probe") if seeds is None else seeds
    request = resolve_probe(method, selection=selection, solver=solver, device=device, **options)
    stores = matching_stores(dataset=dataset, backbone=backbone, size=size, store=store,
                             workdir=workdir)
    if preset is not None:
        stores = _preset_stores(preset, stores, explicit=store is not None)
    stores = _usable_stores(request, stores, explicit=store is not None)
    plan = [(s, spec, request.key(s, spec)) for s in stores
            for spec in _subsets(s, request, fractions, shots, seeds, sampler, episodes, ways,
                                 episode_file)]
    registry = Registry.in_workdir(workdir)
    done = set() if force else finished_keys(workdir, [key for _, _, key in plan],
                                             registry=registry)
    skipped = [key for _, _, key in plan if key.digest() in done]
    pending = [(s, spec) for s, spec, key in plan if key.digest() not in done]
    request = for_work(request, pending)
    if pending and request.solver in ("torch", "batched"):
        import torch  # noqa: F401 - the solver imports it anyway; imported before the stores
        #                              are read, it also upcasts their float16 features faster
    computed, arrays, shared_fits, corrupted = [], {}, {}, {}
    for s, spec in tqdm(pending, desc="probe", disable=not progress or not pending):
        if s.path not in arrays:  # one store in memory at a time
            arrays = {s.path: StoreArrays.load(s, device=request.features_device())}
            corrupted = {s.path: available_pairs(s)}
        scored = probe_job(s, spec=spec, probe=request, arrays=arrays[s.path],
                           shared_fits=shared_fits, corrupted=corrupted[s.path])
        row, scores, y_test = scored
        if registry.add(row, scores=scores, y_true=y_test, replace=force):
            computed.append(row)
            record(registry, workdir, scored)
        else:  # another process recorded this key since the registry was asked
            skipped.append(row.key)
    filled = _fill_recorded(registry, [(s, spec, key) for s, spec, key in plan
                                       if key.digest() in done], request, workdir, progress)
    return ProbeReport(computed=computed, skipped=skipped, wall_s=time.perf_counter() - start,
                       corrupted_filled=filled)


def _usable_stores(request: ProbeRequest, stores: list, *, explicit: bool) -> list:
    """The stores the method can use (ProbeMethod.refuses): a named store it cannot use, or
    finding none, is an error saying why."""
    refuses = get_method(request.method).refuses
    if refuses is None:
        return stores
    reasons = [(s, refuses(s)) for s in stores]
    kept = [s for s, why in reasons if why is None]
    if explicit or not kept:
        why = next((why for _, why in reasons if why is not None), None)
        if why is not None:
            raise InvalidArgumentError(why)
    return kept


def _subsets(store: FeatureStore, request: ProbeRequest, fractions, shots, seeds, sampler,
             episodes: int | None, ways: int | None, episode_file) -> list:
    """The training subsets a probe call plans on `store` (see `probe`)."""
    episodic = episodes is not None or ways is not None or episode_file is not None
    if not get_method(request.method).trains:
        if episodic or fractions or shots:
            raise InvalidArgumentError(f"--method {request.method} trains on nothing: drop "
                                       "--fractions, --shots and the episode options.")
        return [NoSubset()]
    if episode_file is not None:
        if episodes is not None or ways is not None or fractions or shots or sampler:
            raise InvalidArgumentError("--episode-file names every episode (seed, shots, "
                                       "ways): drop --episodes, --ways, --shots, --fractions "
                                       "and --sampler.")

        return load_episodes(episode_file, dataset=store.request["dataset"],
                             data_digest=store.request["data_digest"],
                             labels=store.labels("train"),
                             task=get_dataset(store.request["dataset"]).task)
    if episodic:
        if episodes is None:
            raise InvalidArgumentError("--ways applies to few-shot episodes: add --episodes N.")
        if fractions or sampler:
            raise InvalidArgumentError("few-shot episodes draw --shots per class by their own "
                                       "rule: drop --fractions and --sampler.")
        info = get_dataset(store.request["dataset"])
        check_episodic(info.task)  # both before anything is read or fitted
        if ways is not None and ways > info.n_classes:
            raise InvalidArgumentError(f"--ways {ways} asks for more classes than {info.flag} "
                                       f"has ({info.n_classes}); give at most {info.n_classes}.")
        return expand_episodes(shots, seeds, episodes, ways)
    return expand_subsets(fractions, shots, seeds, **({"sampler": sampler} if sampler else {}))


def _preset_probe(name: str, method: str, options: dict, sampler: str | None):
    """(options, preset) for probe `method` under preset `name`: the preset's options, with the
    user's where they agree; a differing option or sampler is an error (the run would not be the
    preset's)."""
    found = get_preset(name)
    found.check_probe_method(method)
    fixed = found.probe_options(method)
    for key, value in options.items():
        if key in fixed and fixed[key] != value:
            raise InvalidArgumentError(
                f"preset {name} probes with {key}={fixed[key]!r}, not {value!r}; drop the "
                f"option, or --preset.")
    if sampler is not None and sampler != found.sampler:
        raise InvalidArgumentError(
            f"preset {name} draws subsets with sampler {found.sampler!r}, not {sampler!r}; "
            f"drop --sampler, or --preset.")
    return {**options, **fixed}, found


def _preset_stores(name: str, stores: list[FeatureStore], *, explicit: bool) -> list:
    """The stores extracted as preset `name` extracts them; a named store that was not is an
    error, and so is finding none."""

    found, kept = get_preset(name), []
    for s in stores:
        ref = resolve_backbone(s.request["backbone"], None)
        why = found.store_mismatch(s.request, ref)
        if why is None:
            kept.append(s)
        elif explicit:
            raise StoreError(f"store {s.path.name} was {why}; extract it with `medfm extract "
                             f"--preset {name}`, or drop --preset.")
    if not kept:
        raise StoreError(f"no matching store was extracted as preset {name} extracts; run "
                         f"`medfm extract --preset {name} ...` for it first.")
    return kept


def _fill_recorded(registry: Registry, recorded: list, request: ProbeRequest, workdir,
                   progress: bool) -> int:
    """Score recorded runs on the corrupted splits their stores gained since; returns how many
    evaluations were added."""
    from tqdm.auto import tqdm

    pairs_of = {}
    for s, _, _ in recorded:
        if s.path not in pairs_of:
            pairs_of[s.path] = available_pairs(s)
    recorded = [item for item in recorded  # W-way episodes score their classes only: no
                if pairs_of[item[0].path] and item[1].ways is None]  # corrupted full splits
    if not recorded:
        return 0
    have = registry.evaluated([key for _, _, key in recorded])
    todo = []
    for s, spec, key in recorded:
        missing = {p: sib for p, sib in pairs_of[s.path].items()
                   if p not in have.get(key.digest(), set())}
        if missing:
            todo.append((s, spec, key, missing))
    added, arrays = 0, {}
    for s, spec, key, missing in tqdm(todo, desc="corrupted splits",
                                      disable=not progress or not todo):
        if s.path not in arrays:
            arrays = {s.path: StoreArrays.load(s)}
        evaluations, state = fill_corrupted(s, spec, request, key, missing, workdir=workdir,
                                            arrays=arrays[s.path])
        if state is not None:
            save_state(workdir, key.digest(), state)
        for ev in evaluations:
            added += registry.add_evaluation(key, ev.corruption, ev.severity, ev.metrics,
                                             ev.scores)
    return added
