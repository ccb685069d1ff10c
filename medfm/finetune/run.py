"""Fine-tuning jobs: one (dataset, size, backbone, subset, recipe) trained and tested, and
batches of them recorded in the results registry.

    from medfm.finetune import finetune
    finetune(datasets=["breastmnist"], backbones=["resnet18"], sizes=[28], seeds=(0, 1, 2),
             recipe="medmnist-v2", weights="random")

Protocol. The training subset comes from the same sampler as the probe (sampling.py), so
"10% seed 1" is the same images for both; training follows the recipe (train.py) with validation
on the official val split, and the checkpoint chosen by the recipe's metric is scored once on the
official test split with medfm.metrics (MedMNIST-exact ACC/AUC, balanced accuracy, bootstrap CIs).
A result's key holds everything that changes it: dataset, size, backbone and weights digest, resize
policy, input size, device type (`backend`), subset, seed, checkpoint metric (`selection`) and the
whole resolved recipe (`params`). `finetune` skips a combination whose row is already in the
registry before it loads any model, and a killed job resumes from
`<workdir>/checkpoints/<key digest>/last.pt`; a finished job leaves its best weights there as
`best.pt`.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfm import __version__
from medfm.backbones import create_backbone, resolve_name, state_dict_digest
from medfm.data import check_size, get_dataset, load_split
from medfm.errors import InvalidArgumentError
from medfm.extract.extractor import resolve_device
from medfm.finetune.recipes import Recipe, resolve_recipe
from medfm.finetune.train import (
    CHECKPOINT_NAME,
    EVAL_BATCH_FACTOR,
    Split,
    apply_cifar_stem,
    output_dim,
    predict,
    train,
    TaskLoss,
)
from medfm.metrics import evaluate
from medfm.paths import resolve_workdir
from medfm.preprocess import DevicePreprocessor, resolve_preprocess
from medfm.sampling import SubsetSpec, sample
from medfm.store.registry import Registry, ResultKey, ResultRow, canonical_json

CHECKPOINTS_DIR = "checkpoints"  # under the work directory, one folder per result key digest
BEST_WEIGHTS_NAME = "best.pt"  # the tested weights of a finished job (state dict)
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # normalize="half" (MedMNIST v2)
HEAD_INIT_STD = 0.01  # new head on a pretrained backbone: small normal weights, zero bias


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
DEFAULT_FRACTIONS = (1.0,)  # when neither fractions nor shots are given: the whole train split
FEATURE_KIND = ""  # finetune reads images, not stored features


@dataclass(frozen=True)
class FinetuneReport:
    """What a `finetune` batch did: the rows it added and the keys it found already done."""

    ran: tuple[ResultRow, ...]  # rows trained and added in this call
    skipped: tuple[str, ...]  # "dataset@size backbone subset seed" of combinations already done


def _weights_for(recipe: Recipe, weights: str | None) -> str | None:
    """The weights to load: a from-scratch recipe forces a seeded random init."""
    if recipe.pretrained:
        return weights
    if weights is None or weights.strip().lower() in ("random", "none"):
        return "random"
    raise InvalidArgumentError(
        f"recipe {recipe.name!r} trains from scratch (pretrained=false) but weights {weights!r} "
        "were given; drop --weights, or override pretrained=true to fine-tune them.")


def _weights_identity(weights: str | None) -> str | None:
    """What identifies the requested weights before loading: a file by path, size and mtime."""
    if weights and weights.strip().lower() not in ("random", "none") and Path(weights).exists():
        stat = Path(weights).stat()
        return f"{Path(weights).resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return weights


def _request(backbone: str, weights: str | None) -> dict:
    return {"backbone": backbone, "weights": _weights_identity(weights)}


def _versions() -> dict:
    import timm

    return {"medfm": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _subset_label(spec: SubsetSpec) -> str:
    return f"f={spec.fraction}" if spec.fraction is not None else f"k={spec.shots}"


def finetune_job(
    *,
    dataset: str,
    backbone: str,
    size: int,
    spec: SubsetSpec,
    recipe: Recipe,
    weights: str | None = None,
    device: str | None = None,
    workdir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[int], None] | None = None,
) -> tuple[ResultRow, np.ndarray, np.ndarray]:
    """Train `backbone` end-to-end on the `spec` subset of `dataset`@`size` and test it.

    Returns (row, test scores (N, C) float32, test labels (N, L)); writes nothing to the registry.
    Checkpoints go to `<workdir>/checkpoints/<key digest>/`; a killed call, rerun, resumes there.
    `on_checkpoint(round)` runs after each checkpoint (for tests and schedulers).
    """
    t0 = time.perf_counter()
    info = get_dataset(dataset)
    size = check_size(size)
    dev = resolve_device(device)
    weights = _weights_for(recipe, weights)
    splits = {s: load_split(info.flag, size, s, data_root) for s in ("train", "val", "test")}
    subset = sample(np.asarray(splits["train"][1]), info.task, spec)

    # the run's seed also seeds every fresh weight (new head; all of a from-scratch model), as
    # the references' seeds do
    bb = create_backbone(backbone, weights=weights, init_seed=spec.seed,
                         num_classes=output_dim(info.task, info.n_classes, recipe))
    model = bb.model
    if recipe.pretrained:
        init_head(model, seed=spec.seed)
    weights_digest = bb.weights_digest
    if recipe.stem == "cifar":
        model = apply_cifar_stem(model, seed=spec.seed)
        weights_digest = state_dict_digest(model)
    mean, std = HALF_MEAN_STD if recipe.normalize == "half" else (None, None)
    cfg = resolve_preprocess(bb.data_config, input_size=recipe.input_size,
                             resize_policy=recipe.resize_policy, mean=mean, std=std,
                             source_size=size)
    primary = info.primary_metric
    select = primary if recipe.select_metric == "primary" else recipe.select_metric
    key = ResultKey(
        dataset=info.flag, size=size, backbone=bb.arch, tag=bb.tag, weights_digest=weights_digest,
        resize_policy=cfg.resize_policy, input_size=cfg.input_size, feature_kind=FEATURE_KIND,
        method="finetune", backend=dev.type, fraction=spec.fraction, shots=spec.shots,
        seed=spec.seed, selection=f"val_{select}", params=canonical_json(recipe.to_params()),
    )
    ckpt_dir = resolve_workdir(workdir) / CHECKPOINTS_DIR / key.digest()
    t_train = time.perf_counter()
    outcome = train(
        model, recipe=recipe, task=info.task,
        train=Split(*splits["train"], rows=subset.indices), val=Split(*splits["val"]),
        preprocess=cfg, device=dev, seed=spec.seed, primary_metric=primary,
        checkpoint_dir=ckpt_dir, progress=progress, on_checkpoint=on_checkpoint,
        desc=f"{info.flag}@{size} {bb.arch} {_subset_label(spec)} s{spec.seed}",
    )
    t_train = time.perf_counter() - t_train
    test = Split(*splits["test"])
    prep = DevicePreprocessor(cfg, dev, channels_last=dev.type in ("cuda", "cpu"))
    scores, test_loss = predict(outcome.model, test, prep=prep,
                                loss=TaskLoss(info.task, recipe, 0.0),
                                batch_size=min(recipe.batch_size, subset.n) * EVAL_BATCH_FACTOR)
    y_true = np.asarray(test.labels)
    metrics = evaluate(y_true, scores, info.task)
    wall = time.perf_counter() - t0
    row = ResultRow(
        key=key, n_train=subset.n, subset_digest=subset.digest, chosen_C=None,
        acc=metrics.acc, auc=metrics.auc, balanced_acc=metrics.balanced_acc,
        acc_ci_low=metrics.acc_ci[0], acc_ci_high=metrics.acc_ci[1],
        auc_ci_low=metrics.auc_ci[0], auc_ci_high=metrics.auc_ci[1],
        extra={
            "recipe": recipe.name,
            "request": _request(backbone, weights),
            "weights": bb.weights,
            "preprocess": cfg.to_json(),
            "device": _device_name(dev),
            "best_round": outcome.best_round,
            "best_value": outcome.best_value if np.isfinite(outcome.best_value) else None,
            "steps": outcome.steps,
            "stopped_early": outcome.stopped_early,
            "resumed": outcome.resumed,
            "train_images_per_s": round(outcome.images_per_s, 2),
            "test_loss": test_loss,
            "curves": outcome.curves,
        },
        versions=_versions(),
        wall_s=wall - t_train + outcome.train_seconds,  # training summed over resumed calls
    )
    return row, scores, y_true


def finish_checkpoint(workdir: str | os.PathLike | None, key: ResultKey) -> None:
    """After the row is recorded: keep the tested weights as best.pt, drop the resumable state."""
    folder = resolve_workdir(workdir) / CHECKPOINTS_DIR / key.digest()
    last = folder / CHECKPOINT_NAME
    if last.exists():
        saved = torch.load(last, map_location="cpu", weights_only=False)
        tmp = folder / f".{BEST_WEIGHTS_NAME}.tmp"
        torch.save(saved["state"]["best_state"], tmp)
        os.replace(tmp, folder / BEST_WEIGHTS_NAME)
        last.unlink()


def _specs(fractions: Sequence[float] | None, shots: Sequence[int] | None,
           seeds: Sequence[int]) -> list[SubsetSpec]:
    if fractions is None and shots is None:
        fractions = DEFAULT_FRACTIONS
    specs = [SubsetSpec(fraction=f, seed=s) for f in fractions or () for s in seeds]
    specs += [SubsetSpec(shots=k, seed=s) for k in shots or () for s in seeds]
    return specs


def _already_done(reg: Registry, *, dataset: str, size: int, arch: str, backend: str,
                  spec: SubsetSpec, params: str, request: dict) -> bool:
    """Whether a row for this request is in the registry, found without loading any model."""
    rows = reg.query(dataset=dataset, size=size, backbone=arch, method="finetune",
                     backend=backend, fraction=spec.fraction, shots=spec.shots, seed=spec.seed,
                     params=params)
    return any(row.extra.get("request") == request for row in rows)


def finetune_done(registry: Registry, *, dataset: str, size: int, backbone: str,
                  spec: SubsetSpec, recipe: Recipe, weights: str | None = None,
                  device_type: str) -> bool:
    """Whether `finetune_job` with these arguments on a `device_type` ("cpu", "cuda") device
    already has its row in `registry`, found without loading any model or data."""
    arch, _, _ = resolve_name(backbone)
    return _already_done(registry, dataset=get_dataset(dataset).flag, size=check_size(size),
                         arch=arch, backend=device_type, spec=spec,
                         params=canonical_json(recipe.to_params()),
                         request=_request(backbone, _weights_for(recipe, weights)))


def finetune(
    *,
    datasets: Sequence[str],
    backbones: Sequence[str],
    sizes: Sequence[int],
    fractions: Sequence[float] | None = None,
    shots: Sequence[int] | None = None,
    seeds: Sequence[int] = (0,),
    recipe: str | Recipe = "medfm",
    overrides: dict | None = None,
    weights: str | None = None,
    device: str | None = None,
    workdir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
) -> FinetuneReport:
    """Run `finetune_job` for every dataset x size x backbone x subset x seed; record each row.

    Subsets: every fraction and every shot count, each under every seed (fraction 1.0 when
    neither is given). A combination already in the registry is skipped before any model loads,
    unless `force`, which retrains it and replaces its row. Rows carry per-sample test scores.
    """
    resolved = resolve_recipe(recipe, **(overrides or {}))
    specs = _specs(fractions, shots, seeds)
    dev = resolve_device(device)
    reg = Registry.in_workdir(workdir)
    ran, skipped = [], []
    for dataset in datasets:
        info = get_dataset(dataset)
        for size in sizes:
            size = check_size(size)
            for backbone in backbones:
                for spec in specs:
                    label = f"{info.flag}@{size} {backbone} {_subset_label(spec)} seed {spec.seed}"
                    if not force and finetune_done(
                            reg, dataset=info.flag, size=size, backbone=backbone, spec=spec,
                            recipe=resolved, weights=weights, device_type=dev.type):
                        skipped.append(label)
                        continue
                    row, scores, y_true = finetune_job(
                        dataset=info.flag, backbone=backbone, size=size, spec=spec,
                        recipe=resolved, weights=weights, device=str(dev), workdir=workdir,
                        data_root=data_root, progress=progress)
                    reg.add(row, scores=scores, y_true=y_true, replace=force)
                    finish_checkpoint(workdir, row.key)
                    ran.append(row)
    return FinetuneReport(ran=tuple(ran), skipped=tuple(skipped))
