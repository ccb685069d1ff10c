"""Fine-tuning jobs: one (dataset, size, backbone, subset, recipe) trained and tested, and
batches of them recorded in the results registry.

    from medfm.finetune import finetune
    finetune(datasets=["breastmnist"], backbones=["resnet18"], sizes=[28], seeds=(0, 1, 2),
             recipe="medmnist-v2", weights="random")

Protocol. The training subset comes from the same sampler as the probe (sampling.py), so
"10% seed 1" is the same images for both; training follows the recipe (train.py) with validation
on the official val split, and the checkpoint chosen by the recipe's metric is scored once on the
official test split with medfm.metrics (MedMNIST-exact ACC/AUC, balanced accuracy, bootstrap CIs).
Preprocessing is one request (medfm.preprocess): the recipe's, with every field the user (or the
grid spec) sets in its place. A run resolves to a `FinetuneRequest` before any model or image
loads, and its key (medfm.resolve.keys.run_key) holds everything that changes the result: the
dataset
file, the backbone and weights identity, the resolved preprocessing, the subset and seed, the
checkpoint metric, the method ("finetune", or "lora" when the recipe trains LoRA adapters: its own
paradigm in results and reports) and the rest of the resolved recipe (`params`, LoRA's rank,
alpha, dropout, targets and lr among them). Every row records the model's total and trainable
parameter counts and the layers LoRA adapted (`extra`). The device it trains on, whether
it ran with deterministic kernels only (`deterministic`) and whether torch.compile ran the model
(`compiled`, with its warm-up seconds), are recorded with the row, not keyed. Every trained run
records its throughput (medfm.throughput) for the cost estimates of `medfm grid --dry-run`.
`finetune` skips every combination whose key is in the registry (one query), and a killed job
resumes from `<workdir>/checkpoints/<key digest>/last.pt`; a finished job leaves its best weights
there as `best.pt`.

One writer per run. A job holds an advisory lock on `.lock` in its checkpoint folder (flock: the
OS drops it when the process dies, however it dies) from before it resumes until its row is
recorded and its checkpoint finished; the file holds the holder's pid. A second process asking
for the same run says once whom it waits for, then, holding the lock, asks the registry again:
a run recorded meanwhile is reused, not retrained. A grid job (`finetune_job`) holds the lock
while it trains and tests; its driver records the row and takes the lock to finish the
checkpoint, and a process that gets the lock in between finds a finished last.pt and only tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medfm.backbones import create_backbone
from medfm.data import DatasetRef, get_dataset, load_split
from medfm.errors import MedfmError, MedfmWarning
from medfm.finetune.lora import adapted_modules, apply_lora
from medfm.resolve.recipes import Recipe
from medfm.finetune.train import (
    CHECKPOINT_NAME,
    EVAL_BATCH_FACTOR,
    Split,
    TaskLoss,
    apply_cifar_stem,
    load_checkpoint,
    load_model_state,
    output_dim,
    predict,
    remove_stale_temps,
    save_checkpoint,
    set_aside,
    train,
)
from medfm.metrics import evaluate
from medfm.paths import resolve_workdir
from medfm.preprocess import DevicePreprocessor
from medfm.robust.corrupt import corrupt
from medfm.robust.score import Evaluation, ScoredRun, record
from medfm.robust.stores import CORRUPTED_DIRNAME, CorruptedStore
from medfm.resolve.finetune import FinetuneRequest, finetune_requests
from medfm.runtime import deterministic_algorithms, device_name, resolve_device, versions
from medfm.throughput import Measurement, record_throughput
from medfm.sampling import sample
from medfm.store.done import finished_keys, recorded_run
from medfm.store.registry import Registry, ResultRow
from medfm.resolve.keys import ResultKey

CHECKPOINTS_DIR = "checkpoints"  # under the work directory, one folder per result key digest
BEST_WEIGHTS_NAME = "best.pt"  # the tested weights of a finished job (state dict)
LOCK_NAME = ".lock"  # in a run's checkpoint folder: flock-ed by the process working on the run
HEAD_INIT_STD = 0.01  # new head on a pretrained backbone: small normal weights, zero bias
FINETUNE_VERSIONS = ("torch", "timm")  # recorded with every fine-tune row


def init_head(model: torch.nn.Module, *, seed: int, std: float = HEAD_INIT_STD) -> None:
    """Re-initialize the classifier as linear-evaluation codes do (N(0, std), zero bias).

    timm's EfficientNet init scales a head by 1/sqrt(n_classes): std 0.4 for 2 classes, logits
    of +-20 on pooled ImageNet features, and hundreds of steps lost unlearning them.
    """
    head = model.get_classifier()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=std)
                torch.nn.init.zeros_(module.bias)


def _build_model(request: FinetuneRequest):
    """(model, loaded weights digest, weights source) with the task's head, seeded by the run."""
    info = get_dataset(request.dataset.name)
    # the run's seed also seeds every fresh weight (new head; all of a from-scratch model), as
    # the references' seeds do
    bb = create_backbone(request.backbone, init_seed=request.spec.seed,
                         num_classes=output_dim(info.task, info.n_classes, request.recipe))
    model = bb.model
    if request.recipe.pretrained and request.recipe.head_init == "small":
        init_head(model, seed=request.spec.seed)  # "timm": the head keeps timm's own init
    if request.recipe.stem == "cifar":
        model = apply_cifar_stem(model, seed=request.spec.seed)
    if request.recipe.lora_rank:
        model = apply_lora(model, request.recipe, seed=request.spec.seed)
    return model, bb.weights_digest, bb.weights


def checkpoint_folder(workdir: str | os.PathLike | None, key: ResultKey) -> Path:
    """`<workdir>/checkpoints/<key digest>`: a run's checkpoints, best weights and lock."""
    return resolve_workdir(workdir) / CHECKPOINTS_DIR / key.digest()


@contextlib.contextmanager
def _claim(folder: Path, label: str) -> Iterator[None]:
    """Hold the run's lock (an exclusive flock on `folder/.lock`, which gets this process's pid)
    for the block; while another process holds it, say so on one line and wait."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            who = f"pid {holder}" if holder else "another process"
            tqdm.write(f"waiting for {who}, which is training {label}", file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _recorded(workdir: str | os.PathLike | None,
              key: ResultKey) -> tuple[ResultRow, np.ndarray, np.ndarray] | None:
    """(row, test scores, test labels) of a run already recorded with its tested weights kept
    (medfm.store.done.recorded_run), else None."""
    return recorded_run(workdir, key, needs=checkpoint_folder(workdir, key) / BEST_WEIGHTS_NAME)


def finetune_job(
    request: FinetuneRequest,
    *,
    device: str | None = None,
    workdir: str | os.PathLike | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[int], None] | None = None,
    deterministic: bool = False,
    compile: bool = False,
) -> tuple[ResultRow, np.ndarray, np.ndarray]:
    """Train the request's backbone end to end on its subset and test it.

    Returns (row, test scores (N, C) float32, test labels (N, L)); writes nothing to the registry.
    Checkpoints go to `<workdir>/checkpoints/<key digest>/`; a killed call, rerun, resumes there.
    The call holds the run's lock (module docstring); a run that is in the registry once the
    lock is held returns its recorded row and scores, untrained.
    `on_checkpoint(round)` runs after each checkpoint (for tests and schedulers).
    `deterministic` trains and tests with deterministic kernels only (medfm.runtime
    .deterministic_algorithms): on CUDA, the same bits on every run and resume.
    `compile` trains and tests the model torch.compile-d (recorded, not keyed).
    """
    key = request.key()
    with _claim(checkpoint_folder(workdir, key), request.label):
        recorded = _recorded(workdir, key)
        if recorded is not None:
            return recorded
        return _train_and_test(request, key, device=device, workdir=workdir, progress=progress,
                               on_checkpoint=on_checkpoint, deterministic=deterministic,
                               compile=compile)


def _train_and_test(
    request: FinetuneRequest,
    key: ResultKey,
    *,
    device: str | None,
    workdir: str | os.PathLike | None,
    progress: bool,
    on_checkpoint: Callable[[int], None] | None,
    deterministic: bool = False,
    compile: bool = False,
) -> tuple[ResultRow, np.ndarray, np.ndarray]:
    """`finetune_job`'s work, for a caller that holds the run's lock."""
    t0 = time.perf_counter()
    info = get_dataset(request.dataset.name)
    dev = resolve_device(device)
    root = request.dataset.path.parent
    splits = {s: load_split(info.flag, request.dataset.size, s, root)
              for s in ("train", "val", "test")}
    subset = sample(np.asarray(splits["train"][1]), info.task, request.spec)
    model, weights_digest, source = _build_model(request)
    kernels = deterministic_algorithms() if deterministic else contextlib.nullcontext()
    with kernels:  # training, validation and test scores alike
        t_train = t_train0 = time.perf_counter()
        outcome = train(
            model, recipe=request.recipe, task=info.task,
            train=Split(*splits["train"], rows=subset.indices), val=Split(*splits["val"]),
            preprocess=request.preprocess, device=dev, seed=request.spec.seed,
            primary_metric=info.primary_metric,
            checkpoint_dir=checkpoint_folder(workdir, key),
            progress=progress, on_checkpoint=on_checkpoint, desc=request.label,
            compile=compile)
        t_train = time.perf_counter() - t_train
        t_test = time.perf_counter()
        test = Split(*splits["test"])
        prep = DevicePreprocessor(request.preprocess, dev, channels_last=True)
        batch = min(request.recipe.batch_size, subset.n) * EVAL_BATCH_FACTOR
        scores, test_loss = predict(outcome.model, test, prep=prep,
                                    loss=TaskLoss(info.task, request.recipe, 0.0), batch_size=batch)
        y_true = np.asarray(test.labels)
        evaluations = evaluate_corrupted(
            outcome.model, request, corrupted_pairs(request.dataset, workdir), test, prep=prep,
            loss=TaskLoss(info.task, request.recipe, 0.0), batch_size=batch)
        t_test = time.perf_counter() - t_test
    _record_throughput(request, outcome, dev, setup_s=t_train0 - t0, test_s=t_test,
                       n_val=len(splits["val"][1]), n_test=len(y_true) * (1 + len(evaluations)),
                       compiled=compile)
    row = ResultRow.scored(
        key, subset, evaluate(y_true, scores, info.task), solver="", device=dev.type,
        weights_digest=weights_digest,
        extra={
            "recipe": request.recipe.name,
            "backbone_name": request.backbone.name,
            "weights_source": source,
            "preprocess": request.preprocess.to_json(),
            "device_name": device_name(dev),
            "deterministic": deterministic,
            "compiled": compile,
            "compile_warmup_s": round(outcome.compile_warmup_s, 3),
            "best_round": outcome.best_round,
            "best_value": outcome.best_value if np.isfinite(outcome.best_value) else None,
            "steps": outcome.steps,
            "train_images": outcome.train_images,
            "train_batch": request.recipe.train_batch(subset.n),
            "stopped_early": outcome.stopped_early,
            "resumed": outcome.resumed,
            "train_images_per_s": round(outcome.images_per_s, 2),
            "test_loss": test_loss,
            **_parameter_counts(outcome.model),
            "curves": outcome.curves,
        },
        versions=versions(*FINETUNE_VERSIONS),
        # training time summed over resumed calls
        wall_s=time.perf_counter() - t0 - t_train + outcome.train_seconds,
    )
    return ScoredRun(row, scores, y_true, evaluations)


def _record_throughput(request: FinetuneRequest, outcome, dev: torch.device, *, setup_s: float,
                       test_s: float, n_val: int, n_test: int, compiled: bool) -> None:
    """Cache this run's figures (medfm.throughput): training images/s (compilation excluded),
    validation and test images/s, and its fixed seconds (loading data and model, compiling)."""
    train_s = outcome.train_compute_s - outcome.compile_warmup_s
    if outcome.train_images <= 0 or train_s <= 0:
        return
    eval_images = len(outcome.curves) * n_val + n_test
    eval_s = outcome.train_seconds - outcome.train_compute_s + test_s
    record_throughput(Measurement(
        stage="finetune", arch=request.backbone.arch, input_size=request.preprocess.input_size,
        device=device_name(dev), precision="bfloat16" if dev.type == "cuda" else "float32",
        compiled=compiled, rate=outcome.train_images / train_s,
        overhead_s=setup_s + outcome.compile_warmup_s,
        eval_rate=eval_images / eval_s if eval_s > 0 else 0.0, units=outcome.train_images,
        eval_units=eval_images))


def _parameter_counts(model: torch.nn.Module) -> dict:
    """What a row records of the model's size: parameters in all, those trained, and the
    layers LoRA adapted (0 without adapters; their tensors count in both totals)."""
    return {"total_params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "lora_modules": adapted_modules(model)}


def corrupted_pairs(dataset: DatasetRef, workdir) -> dict:
    """(corruption, severity) -> (seed, base) of every corrupted test split extracted in the
    work directory for this dataset file (any backbone: the images are the same), so a
    fine-tune is scored on the corruptions its probes are."""
    folder = resolve_workdir(workdir) / "stores" / CORRUPTED_DIRNAME
    pairs: dict = {}
    for path in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
        try:
            sibling = CorruptedStore(path)
        except MedfmError:
            continue  # a damaged sibling is reported when a probe reads it
        store = sibling.identity.get("store", {})
        if (store.get("dataset"), store.get("size"), store.get("data_digest")) == (
                dataset.name, dataset.size, dataset.digest):
            for pair in sibling.pairs:
                pairs.setdefault(tuple(pair), (sibling.identity["seed"],
                                               sibling.identity.get("base")))
    return pairs


def evaluate_corrupted(model, request: FinetuneRequest, pairs: dict, test: Split, *, prep,
                       loss, batch_size: int) -> list:
    """The trained model on each corrupted test split (images corrupted as the stores' were:
    medfm.robust.corrupt with the same seed), as medfm.robust.score.Evaluation objects."""
    if not pairs:
        return []
    info = get_dataset(request.dataset.name)
    images, labels = np.asarray(test.images), np.asarray(test.labels)
    out = []
    for (corruption, severity), (seed, base) in sorted(pairs.items()):
        corrupted = corrupt(images, info.flag, corruption, severity, seed=seed, base=base)
        scores, _ = predict(model, Split(corrupted, labels), prep=prep, loss=loss,
                            batch_size=batch_size)
        out.append(Evaluation(corruption, severity, evaluate(labels, scores, info.task),
                              scores))
    return out


def fill_corrupted(request: FinetuneRequest, *, device: str | None = None,
                   workdir=None) -> list:
    """A recorded fine-tune scored, from its tested weights (best.pt), on the corrupted test
    splits it lacks; [] when it has them all or its weights were not kept."""
    key = request.key()
    best = checkpoint_folder(workdir, key) / BEST_WEIGHTS_NAME
    pairs = corrupted_pairs(request.dataset, workdir)
    if not pairs or not best.exists():
        return []
    reg = Registry.in_workdir(workdir)
    try:
        have = reg.evaluated([key]).get(key.digest(), set())
    finally:
        reg.close()
    missing = {p: v for p, v in pairs.items() if p not in have}
    if not missing:
        return []
    try:
        weights = torch.load(best, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable best.pt: nothing to score from
        warnings.warn(MedfmWarning(
            f"{best} cannot be read as tensors ({type(exc).__name__}), so run "
            f"{key.digest()[:12]} is not scored on {len(missing)} corrupted split(s); its clean "
            "row is kept: delete the file and rerun with --force to retrain it"), stacklevel=2)
        return []
    model, _, _ = _build_model(request)
    load_model_state(model, weights, request.recipe)
    dev = resolve_device(device)
    model.to(dev)
    info = get_dataset(request.dataset.name)
    test = Split(*load_split(info.flag, request.dataset.size, "test",
                             request.dataset.path.parent))
    prep = DevicePreprocessor(request.preprocess, dev, channels_last=True)
    return evaluate_corrupted(model, request, missing, test, prep=prep,
                              loss=TaskLoss(info.task, request.recipe, 0.0),
                              batch_size=request.recipe.batch_size * EVAL_BATCH_FACTOR)


def finish_checkpoint(workdir: str | os.PathLike | None, key: ResultKey) -> None:
    """After the row is recorded: keep the tested weights as best.pt, drop the resumable state
    (holding the run's lock, so never under a process that works on the run)."""
    folder = checkpoint_folder(workdir, key)
    if (folder / CHECKPOINT_NAME).exists():
        with _claim(folder, f"run {key.digest()[:12]}"):
            _finish(folder)


def _finish(folder: Path) -> None:
    """`finish_checkpoint`'s work, for a caller that holds the run's lock."""
    last = folder / CHECKPOINT_NAME
    saved = load_checkpoint(last)  # None when gone meanwhile, or set aside
    if saved is not None:
        best = saved["state"].get("best_state") if isinstance(saved["state"], dict) else None
        if best is None:
            set_aside(last, "holds no best weights")
        else:
            save_checkpoint(best, folder / BEST_WEIGHTS_NAME)
            last.unlink()
    remove_stale_temps(folder)


@dataclass(frozen=True)
class FinetuneReport:
    """What a `finetune` batch did: the rows it added and the runs it found already done."""

    ran: tuple[ResultRow, ...]  # rows trained and added in this call
    skipped: tuple[str, ...]  # labels of the runs already in the registry
    missing: tuple[str, ...] = ()  # default datasets skipped for want of their file
    corrupted_filled: int = 0  # corrupted-split evaluations added to runs recorded before


def finetune(
    *,
    backbones: Sequence[str],
    sizes: Sequence[int],
    datasets: Sequence[str] | None = None,
    fractions: Sequence[float] | None = None,
    shots: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    recipe: str | Recipe | None = None,
    overrides: dict | None = None,
    resize_policy: str | None = None,
    input_size: int | None = None,
    normalize: str | None = None,
    weights: str | None = None,
    lora: bool = False,
    device: str | None = None,
    workdir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    deterministic: bool = False,
    sampler: str | None = None,
    preset: str | None = None,
    compile: bool = False,
) -> FinetuneReport:
    """Run `finetune_job` for every dataset x size x backbone x subset x seed; record each row.

    `datasets=None` means every MedMNIST dataset whose file is present (medfm.data
    .resolve_datasets). Subsets: every fraction and every shot count, each under every seed
    (fraction 1.0 when neither is given). Every run resolves first, so a bad name fails before
    anything trains; runs already in the registry are skipped (one query, asked again for each run
    once its lock is held), unless `force`, which retrains them and replaces their rows.
    `resize_policy`, `input_size` and `normalize` override the recipe's preprocessing. `lora`
    trains LoRA adapters instead of the whole backbone (recipe fields lora_*; rank LORA_RANK
    unless the recipe or `overrides` set one). Rows carry per-sample test scores.
    `deterministic`: deterministic kernels only (see `finetune_job`). `sampler` draws the
    subsets (medfm.sampling.SAMPLERS; None: the default). `recipe` None is "medfm" (or the
    preset's). `preset` (medfm.resolve.presets) runs each backbone as that preset's grid does: its
    recipe with its rules for the backbone (under `overrides`), its preprocessing, sampler, seeds
    and subsets (where not given); a differing recipe, sampler or preprocessing is an error.
    `compile`: torch.compile the model (see `finetune_job`).
    """
    requests, missing = finetune_requests(
        backbones=backbones, sizes=sizes, datasets=datasets, fractions=fractions, shots=shots,
        seeds=seeds, recipe=recipe, overrides=overrides, resize_policy=resize_policy,
        input_size=input_size, normalize=normalize, weights=weights, lora=lora,
        data_root=data_root, sampler=sampler, preset=preset)
    resolve_device(device)  # an unusable --device is one line before anything is written
    reg = Registry.in_workdir(workdir)
    done = set() if force else finished_keys(workdir, [r.key() for r in requests], registry=reg)
    ran, skipped, filled = [], [], 0
    for request in requests:
        key = request.key()
        if key.digest() in done:
            skipped.append(request.label)
            for ev in fill_corrupted(request, device=device, workdir=workdir):
                filled += reg.add_evaluation(key, ev.corruption, ev.severity, ev.metrics,
                                             ev.scores)
            continue
        folder = checkpoint_folder(workdir, key)
        with _claim(folder, request.label):
            if not force and reg.has(key):  # another process recorded it while this one waited
                skipped.append(request.label)
                continue
            scored = _train_and_test(request, key, device=device, workdir=workdir,
                                     progress=progress, on_checkpoint=None,
                                     deterministic=deterministic, compile=compile)
            row, scores, y_true = scored
            inserted = reg.add(row, scores=scores, y_true=y_true, replace=force)
            if inserted:
                record(reg, workdir, scored)  # its corrupted-split evaluations
            _finish(folder)
        if inserted:
            ran.append(row)
        else:  # another writer (a grid driver) recorded the run first
            skipped.append(request.label)
    return FinetuneReport(ran=tuple(ran), skipped=tuple(skipped), missing=tuple(missing),
                          corrupted_filled=filled)

