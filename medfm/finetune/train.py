"""The fine-tuning loop: uint8 batches to the device, preprocessing and augmentation there, AdamW
with separate head and backbone learning rates, validation rounds, best checkpoint, early
stopping, and atomic checkpoints that let a killed run resume to the same result.

    outcome = train(model, recipe=recipe, task=Task.BINARY, train=Split(x, y, rows),
                    val=Split(vx, vy), preprocess=cfg, device=torch.device("cpu"), seed=0,
                    checkpoint_dir=path)
    outcome.model  # best checkpoint loaded, eval mode; outcome.curves: one dict per validation

Method. The training subset is visited in epochs; epoch e is the permutation
`numpy.random.default_rng([seed, e])` of its rows, cut into batches of `recipe.train_batch(n)` (a
trailing batch of one image is dropped: BatchNorm cannot train on it). A step uploads the batch as
uint8, preprocesses it on the device (preprocess.py), augments it there when the recipe says so
(flip and small affine, drawn from a generator seeded by (seed, step), so a step's augmentation
never depends on what ran before), then runs forward/backward under bf16 autocast on CUDA with
channels_last, clips gradients and steps the optimizer and the per-step lr schedule (preprocessing
and augmentation run in float32 outside autocast, so a GPU run sees the same inputs). Every round
(one epoch, or `eval_every` steps) the model is validated, the best state by `select_metric` is
kept, early stopping watches `monitor`, and a checkpoint (model, optimizer, scheduler, best state,
curves, RNG states of torch, the training GPU, numpy and Python) replaces the previous one
atomically. A rerun finds the checkpoint and continues from the next round; with the same seed and
device it ends with the same weights as an uninterrupted run: on a CPU bit for bit; on CUDA bit for
bit on the same GPU model and software when the run is deterministic (medfm.runtime
.deterministic_algorithms, `finetune --deterministic`), else only as close as cuDNN's and cuBLAS's
run-to-run differences allow. Resuming where fewer GPUs are visible is fine (one GPU's RNG state).

Checkpoints are caches that a rerun trusts only as data. They hold tensors and plain Python values
only and are read with `torch.load(weights_only=True)`, which runs no code from the file; one
that cannot be read so (truncated, garbage, or a pickle asking for anything else) is renamed
`<name>.unreadable` with one warning, and the run starts afresh. Format-1 checkpoints (numpy's
RNG state pickled as an array) are read with numpy's array-rebuilding globals allowed, nothing
more, and resume. A disk that fills while a checkpoint is written leaves the previous checkpoint
whole and raises DiskFullError; temporary files of killed writers go when the run starts again.
One process writes a checkpoint folder at a time (finetune/run.py holds its lock). A LoRA run's
checkpoints and best state hold only what it trains (adapters and head, `model_state`): the
frozen weights come back from their source when the model is rebuilt.

Losses per task: multi-class and ordinal: cross-entropy; multi-label: BCE with logits per label;
binary: 2 logits + cross-entropy (`ce2`) or 1 logit + BCE (`bce1`); `class_weight="balanced"`
weights each class by its inverse frequency in the training subset (the val loss too). Scores
are probabilities: softmax, or sigmoid (bce1 scores are written as (1 - p, p), like every other
binary row).

The references' loops (docs/presets.md) need a few more recipe settings: `eval_rounds` validates
at the seed paper's epochs instead of every round, `drop_last` drops every partial batch,
`whole_epochs` rounds `iterations` down to whole epochs, `schedule_scope="head"` leaves the
backbone's lr constant, `lr_backbone_vit` is the backbone lr of a transformer, and
`frozen_train_mode` keeps a frozen backbone in train mode (BatchNorm statistics move).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medfm.data import Task
from medfm.errors import DiskFullError, InvalidArgumentError, MedfmWarning, is_disk_full
from medfm.finetune.lora import has_attention, mark_trainable
from medfm.resolve.recipes import Recipe
from medfm.metrics import acc as acc_metric
from medfm.metrics import auc as auc_metric
from medfm.preprocess import DevicePreprocessor, PreprocessConfig

FEW_STEPS = 100  # fewer optimizer steps than this in a whole run draw a warning
CHECKPOINT_NAME = "last.pt"  # the resumable state, replaced atomically after every round
CHECKPOINT_FORMAT = 2  # bumped when the layout changes; 2: numpy RNG state as a tensor (1 resumes)
CHECKPOINT_PARTS = ("plan", "model", "optimizer", "scheduler", "state", "rng")  # its top-level keys
UNREADABLE_SUFFIX = ".unreadable"  # a checkpoint that cannot be read is renamed to <name> + this
TEMP_PATTERN = ".*.tmp"  # checkpoints being written (save_checkpoint); stale once the writer died
WHY_CHARS = 160  # a set-aside warning quotes this much of the reason
DEVICE_CACHE_BYTES = 1 << 31  # training subsets up to 2 GiB are uploaded to the device once
EVAL_BATCH_FACTOR = 2  # evaluation batches are this many training batches (no gradients kept)
AUG_FLIP_P = 0.5  # probability of a horizontal flip
AUG_MAX_DEGREES = 10.0  # rotation drawn uniformly in +-this
AUG_MAX_SHIFT = 0.1  # translation drawn uniformly in +-this share of the image side
AUG_SCALE = (0.9, 1.1)  # zoom drawn uniformly in this range


@dataclass(frozen=True)
class Split:
    """Images and labels of one split; `rows` (sorted) restricts it to a subset without a copy."""

    images: np.ndarray  # (N, H, W) or (N, H, W, 3) uint8, possibly memory-mapped
    labels: np.ndarray  # (N, L) integer labels as in the npz
    rows: np.ndarray | None = None  # rows of this split to use; None = all

    def __len__(self) -> int:
        return len(self.images) if self.rows is None else len(self.rows)

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) at `positions` (0..len-1), read in ascending row order."""
        rows = np.sort(positions if self.rows is None else self.rows[positions])
        return np.ascontiguousarray(self.images[rows]), np.asarray(self.labels[rows])


@dataclass
class TrainOutcome:
    """What `train` produced: the best model and the record of how it got there."""

    model: torch.nn.Module  # best-checkpoint weights, eval mode, on the device
    best_round: int  # 1-based validation round whose weights were kept
    best_value: float  # its value of the selection metric
    selection: str  # "val_<metric>" the checkpoint was chosen by
    curves: list[dict] = field(default_factory=list)  # one entry per validation round
    steps: int = 0  # optimizer steps taken in all
    stopped_early: bool = False  # early stopping ended training before the last step
    resumed: bool = False  # this call continued a checkpoint
    train_seconds: float = 0.0  # training + validation time summed over all calls
    images_per_s: float = 0.0  # training throughput (forward + backward), all rounds
    compile_warmup_s: float = 0.0  # compiled: this call's first optimizer step, compiling
    train_images: int = 0  # images through forward + backward, all calls
    train_compute_s: float = 0.0  # their seconds (validation excluded), all calls


def output_dim(task: Task, n_classes: int, recipe: Recipe) -> int:
    """Width of the classifier head: 1 for a bce1 binary head, else one logit per class/label."""
    return 1 if task is Task.BINARY and recipe.binary_head == "bce1" else n_classes


def apply_cifar_stem(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace a timm ResNet's stem by the CIFAR one: 3x3 conv, stride 1, and no max-pool.

    The new conv keeps the stem's output width (`bn1`) and is initialized under `seed` as timm
    initializes convs (Kaiming normal, fan-out), so the same seed gives the same model.
    """
    if not all(hasattr(model, name) for name in ("conv1", "bn1", "maxpool")):
        raise InvalidArgumentError(
            f"stem 'cifar' needs a ResNet-style backbone (conv1, bn1, maxpool); "
            f"{type(model).__name__} has none. Override stem=default.")
    first = model.conv1[0] if isinstance(model.conv1, torch.nn.Sequential) else model.conv1
    in_chans = first.in_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        conv = torch.nn.Conv2d(in_chans, model.bn1.num_features, 3, stride=1, padding=1,
                               bias=False)
        torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = conv
    model.maxpool = torch.nn.Identity()
    return model


class TaskLoss:
    """Training loss for a task (see module docstring); targets arrive as uint8 (B, L) labels.
    With `train_labels` and the recipe's class_weight "balanced", each class (for BCE: each
    label's positives and negatives) is weighted by n / (K * its count in `train_labels`), as
    scikit-learn's class_weight="balanced" (a class absent from the subset counts as one)."""

    def __init__(self, task: Task, recipe: Recipe, smoothing: float,
                 train_labels: np.ndarray | None = None):
        self.task = Task(task)
        self.bce = task is Task.MULTI_LABEL or (task is Task.BINARY
                                                and recipe.binary_head == "bce1")
        self.smoothing = smoothing
        self.train_labels = (np.asarray(train_labels) if recipe.class_weight == "balanced"
                             and train_labels is not None else None)
        self._weights: torch.Tensor | None = None

    def class_weights(self, n_outputs: int) -> np.ndarray | None:
        """None (unweighted), (K,) cross-entropy weights, or (2, L) BCE weights (row 0 for
        negatives, row 1 for positives) for a head of `n_outputs` logits."""
        if self.train_labels is None:
            return None
        labels = self.train_labels.reshape(len(self.train_labels), -1)
        n = len(labels)
        if self.bce:
            pos = labels.sum(axis=0).astype(np.float64)
            return np.stack([n / (2.0 * np.maximum(n - pos, 1.0)),
                             n / (2.0 * np.maximum(pos, 1.0))])
        counts = np.bincount(labels[:, 0].astype(np.int64), minlength=n_outputs)[:n_outputs]
        return n / (n_outputs * np.maximum(counts, 1).astype(np.float64))

    def _weights_on(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.train_labels is None:
            return None
        if self._weights is None or self._weights.device != logits.device:
            self._weights = torch.as_tensor(self.class_weights(logits.shape[1]),
                                            dtype=torch.float32, device=logits.device)
        return self._weights

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        weights = self._weights_on(logits)
        if self.bce:
            target = labels.float().reshape(logits.shape)  # (B, L) multi-label or (B, 1) binary
            per_element = None if weights is None else torch.where(target > 0.5, weights[1],
                                                                   weights[0])
            target = target * (1.0 - self.smoothing) + 0.5 * self.smoothing
            return F.binary_cross_entropy_with_logits(logits, target, weight=per_element)
        return F.cross_entropy(logits, labels[:, 0].long(), weight=weights,
                               label_smoothing=self.smoothing)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) probabilities; a bce1 binary head gives (1 - p, p)."""
        logits = logits.float()
        if self.task is Task.MULTI_LABEL:
            return torch.sigmoid(logits)
        if self.bce:
            p = torch.sigmoid(logits)  # (B, 1)
            return torch.cat([1.0 - p, p], dim=1)
        return torch.softmax(logits, dim=1)


def augment(x: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Random flip, rotation, shift and zoom of (B, 3, S, S) float images, on their device.

    The draws come from a generator seeded by (seed, step): the same step of the same seed is
    augmented the same way on every run, resumed or not.
    """
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    b = x.shape[0]
    u = torch.rand(b, 5, generator=gen, device=x.device)  # (B, 5) uniform draws
    flip = torch.where(u[:, 0] < AUG_FLIP_P, -1.0, 1.0)
    angle = (2 * u[:, 1] - 1) * math.radians(AUG_MAX_DEGREES)
    scale = AUG_SCALE[0] + (AUG_SCALE[1] - AUG_SCALE[0]) * u[:, 2]
    shift = (2 * u[:, 3:5] - 1) * (2 * AUG_MAX_SHIFT)  # grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # (B, 2, 3) maps output to input coordinates; the flip negates the input x axis
    theta = torch.stack([torch.stack([cos * flip, -sin * flip, shift[:, 0]], dim=1),
                         torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)


def lr_factor(step: int, total_steps: int, recipe: Recipe, steps_per_epoch: int = 1) -> float:
    """Multiplier of the peak learning rates at optimizer step `step` (0-based) of `total_steps`
    (`steps_per_epoch` for cosine-epoch: epoch e of E runs at 0.5 (1 + cos(pi max(0, e - 1) / E)),
    what timm's CosineLRScheduler gives when stepped with epoch=e after each epoch e)."""
    if recipe.schedule == "cosine-epoch":
        epoch, epochs = step // steps_per_epoch, max(1, total_steps // steps_per_epoch)
        return 0.5 * (1.0 + math.cos(math.pi * max(0, epoch - 1) / epochs))
    if recipe.schedule == "cosine":
        warm = round(recipe.warmup * total_steps)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))
    if recipe.schedule == "step":
        passed = sum(step >= round(m * total_steps) for m in recipe.milestones)
        return recipe.gamma ** passed
    if recipe.schedule == "exp":
        return recipe.gamma ** (step // recipe.decay_every)
    return 1.0


def _head_parameter_ids(model: torch.nn.Module) -> set[int]:
    return {id(p) for p in model.get_classifier().parameters()}


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW (or Adam) over two groups, each with its own peak lr: the head, and the backbone
    (LoRA: its adapters, at lora_lr; none when the backbone is frozen); a backbone with
    attention layers (lora.has_attention) trains at lr_backbone_vit when the recipe sets one."""
    head_ids = _head_parameter_ids(model)
    head = [p for p in model.parameters() if id(p) in head_ids]
    groups = [{"params": head, "lr": recipe.lr_head, "name": "head"}]
    if recipe.lora_rank:
        adapters = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups.insert(0, {"params": adapters, "lr": recipe.lora_lr, "name": "adapters"})
    elif not recipe.freeze_backbone:
        body = [p for p in model.parameters() if id(p) not in head_ids]
        lr = (recipe.lr_backbone_vit if recipe.lr_backbone_vit is not None
              and has_attention(model) else recipe.lr_backbone)
        groups.insert(0, {"params": body, "lr": lr, "name": "backbone"})
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=recipe.lr_head, weight_decay=recipe.weight_decay)


def _set_train_mode(model: torch.nn.Module, recipe: Recipe) -> None:
    """Train mode; a frozen backbone stays in eval mode (its BatchNorm statistics do not move)
    unless `frozen_train_mode`; with LoRA only the BatchNorm layers do (the adapters' dropout
    trains)."""
    if recipe.freeze_backbone and not recipe.frozen_train_mode:
        model.eval()
        model.get_classifier().train()
    else:
        model.train()
    if recipe.lora_rank:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def _partial_state(recipe: Recipe) -> bool:
    """Whether checkpoints hold only the trained tensors (LoRA: adapters + head; the frozen
    pretrained weights are rebuilt from their source) rather than the whole state dict."""
    return bool(recipe.lora_rank)


def model_state(model: torch.nn.Module, recipe: Recipe) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model (live tensors; callers copy them)."""
    if _partial_state(recipe):
        return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    return model.state_dict()


def _check_state(model: torch.nn.Module, weights: object, recipe: Recipe) -> None:
    """Raise ValueError unless `weights` has exactly `model_state`'s names and shapes."""
    expected = model_state(model, recipe)
    if not isinstance(weights, dict) or set(weights) != set(expected) or any(
            not isinstance(weights[k], torch.Tensor) or weights[k].shape != v.shape
            for k, v in expected.items()):
        raise ValueError("weights that do not fit the model")


def load_model_state(model: torch.nn.Module, weights: dict, recipe: Recipe) -> None:
    """Load what `model_state` kept; raises ValueError when it does not fit the model."""
    _check_state(model, weights, recipe)
    model.load_state_dict(weights, strict=not _partial_state(recipe))


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps in an epoch of `n` images in batches of `batch_size` (<= n): a trailing
    batch of one image would break BatchNorm, so it is dropped (drop_last: any partial one)."""
    partial = n % batch_size
    return n // batch_size + (1 if partial > 1 and not drop_last else 0)


def images_before(step: int, per_epoch: int, batch_size: int, n: int) -> int:
    """Training images served by steps [0, step) (an epoch's last batch may be partial)."""
    epochs, j = divmod(step, per_epoch)
    return epochs * min(n, per_epoch * batch_size) + min(j * batch_size, n)


class _Batches:
    """Seeded epoch permutations of the training split, served as uint8 batches on the device."""

    def __init__(self, split: Split, batch_size: int, seed: int, device: torch.device,
                 drop_last: bool = False):
        self.split, self.seed, self.device = split, seed, device
        n = len(split)
        self.batch_size = min(batch_size, n)
        self.per_epoch = steps_per_epoch(n, self.batch_size, drop_last)
        self._epoch, self._order = -1, None
        nbytes = split.images[:1].nbytes * n
        self._resident = None
        if nbytes <= DEVICE_CACHE_BYTES:  # whole subset on the device, uint8, once
            images, labels = split.take(np.arange(n))
            self._resident = (torch.from_numpy(images).to(device),
                              torch.from_numpy(labels.astype(np.int64)).to(device))

    def images_before(self, step: int) -> int:
        """Training images served by steps [0, step): a progress bar's position."""
        return images_before(step, self.per_epoch, self.batch_size, len(self.split))

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images uint8, labels int64) of global step `step`, on the device."""
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.split))
        positions = np.sort(self._order[j * self.batch_size:(j + 1) * self.batch_size])
        if self._resident is not None:
            index = torch.from_numpy(positions).to(self.device)
            return self._resident[0][index], self._resident[1][index]
        images, labels = self.split.take(positions)
        pin = self.device.type == "cuda"
        images_t = torch.from_numpy(images)
        images_t = images_t.pin_memory() if pin else images_t
        return (images_t.to(self.device, non_blocking=pin),
                torch.from_numpy(labels.astype(np.int64)).to(self.device))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict(model: torch.nn.Module, split: Split, *, prep: DevicePreprocessor, loss: TaskLoss,
            batch_size: int) -> tuple[np.ndarray, float]:
    """(scores (N, C) float32, mean unsmoothed loss) of `model` on a whole split, in eval mode."""
    model.eval()
    unsmoothed = copy.copy(loss)
    unsmoothed.smoothing = 0.0
    scores, total = [], 0.0
    device = prep.device
    for lo in range(0, len(split), batch_size):
        images, labels = split.take(np.arange(lo, min(lo + batch_size, len(split))))
        x = prep(torch.from_numpy(images))  # preprocessing in float32, outside autocast
        with _autocast(device):
            logits = model(x)
        y = torch.from_numpy(labels.astype(np.int64)).to(device)
        total += float(unsmoothed(logits, y)) * len(images)
        scores.append(loss.scores(logits).cpu().numpy())
    return np.concatenate(scores).astype(np.float32), total / len(split)


def _numpy_array_globals() -> list:
    """What a format-1 checkpoint's numpy RNG state (a uint32 array) needs to load: numpy's
    array-rebuilding function under both its module names, ndarray and the dtypes. They build
    arrays from bytes and run no other code."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def _rng_states(device: torch.device) -> dict:
    """Every RNG's state as tensors and plain values (numpy's (624,) uint32 key as int64); on
    CUDA only the training GPU's generator, the one its kernels draw from."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss),
                        float(gauss)),
              "python": random.getstate()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def cuda_rng_state(saved, index: int) -> torch.Tensor | None:
    """The saved CUDA generator state to give the GPU a run resumes on (`index`, as seen now).

    `saved` is one (N,) uint8 state (the training GPU's), or, in checkpoints written before,
    one per GPU visible then; of those the one of the same index, else the first (the default
    device, the one a pinned worker trains on). So a run resumed where fewer GPUs are visible
    restores what it needs and no more."""
    if saved is None or isinstance(saved, torch.Tensor):
        return saved
    return saved[index] if index < len(saved) else saved[0] if len(saved) else None


def _restore_rng(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    kind, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        state = cuda_rng_state(states.get("cuda"), index)
        if state is not None:
            torch.cuda.set_rng_state(state, index)


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then os.replace: never half-written.

    Out of space or quota, the temporary file is removed, `path` keeps its previous content and
    DiskFullError says so.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFullError(
                f"disk full writing {path}: free space and rerun; training resumes from the "
                "last checkpoint") from None
        raise


def remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files that killed writers left in a checkpoint folder (call it as the
    folder's only writer)."""
    for stale in folder.glob(TEMP_PATTERN):
        stale.unlink(missing_ok=True)


def set_aside(path: Path, why: str) -> None:
    """Rename a checkpoint that cannot be used to `<name>.unreadable` (`.unreadable.1`, ... when
    taken: nothing is deleted) and say so in one warning."""
    aside, n = path.with_name(path.name + UNREADABLE_SUFFIX), 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}{UNREADABLE_SUFFIX}.{n}")
    os.replace(path, aside)
    why = " ".join(why.split())[:WHY_CHARS]  # one line, however long the error it quotes
    warnings.warn(MedfmWarning(
        f"checkpoint {path} {why}; set aside as {aside.name}, training starts afresh"),
        stacklevel=2)


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at `path` in the current format, read as data only; None when there is
    none, or when it cannot be read (then it is set aside, see `set_aside`)."""
    if not path.exists():
        return None
    allowed = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with allowed(_numpy_array_globals()) if allowed else contextlib.nullcontext():
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any file that does not load is set aside
        set_aside(path, f"cannot be read as tensors and plain data ({type(exc).__name__})")
        return None
    try:
        if not (isinstance(saved, dict) and set(CHECKPOINT_PARTS) <= set(saved)
                and isinstance(saved["plan"], dict)):
            raise ValueError("not the parts of a checkpoint")
        if saved["plan"].get("format") == 1:
            # format 1 -> 2: numpy's RNG state held its key as a uint32 array
            kind, key, *rest = saved["rng"]["numpy"]
            key = torch.from_numpy(np.asarray(key, dtype=np.uint32).astype(np.int64))
            saved["rng"]["numpy"] = (kind, key, *rest)
            saved["plan"]["format"] = CHECKPOINT_FORMAT
    except (AttributeError, KeyError, TypeError, ValueError):
        set_aside(path, "is not a medfm checkpoint")
        return None
    return saved


def _is_better(value: float, best: float | None, metric: str) -> bool:
    """Whether `value` improves on `best` (lower is better for loss; NaN never improves)."""
    if best is None:
        return True
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if metric == "loss" else value > best


def _finite(value: float) -> float | None:
    """JSON-safe: NaN (e.g. AUC with a class missing from val) becomes None."""
    return None if math.isnan(value) else value


@dataclass
class TrainState:
    """Where a run stands after each validation round; checkpointed as a plain dict of its
    fields (`vars`), the same in CHECKPOINT_FORMAT 1 and 2."""

    round: int = 0  # validation rounds done
    step: int = 0  # optimizer steps done
    best_round: int = 0  # 1-based round whose weights are kept (select metric)
    best_value: float | None = None  # its select-metric value
    best_state: dict | None = None  # its state dict, on the CPU
    monitor_best: float | None = None  # best value of the early-stopping metric so far
    bad_rounds: int = 0  # rounds since the monitor last improved
    curves: list = field(default_factory=list)  # one dict per round
    done: bool = False  # no more rounds to run
    stopped_early: bool = False  # early stopping ended the run before its last step
    train_seconds: float = 0.0  # training + validation, summed over every call
    train_images: int = 0  # images through forward + backward, for the throughput
    train_compute_s: float = 0.0  # seconds of forward + backward


@dataclass(frozen=True)
class _Plan:
    """The shape of a run, fixed by its recipe and data: a checkpoint resumes only into the same
    plan."""

    n_train: int
    batch_size: int
    total_steps: int
    round_steps: int
    format: int = CHECKPOINT_FORMAT


def _total_steps(recipe: Recipe, per_epoch: int) -> int:
    total = recipe.total_steps(per_epoch)
    if recipe.iterations and recipe.whole_epochs:  # the seed paper: iterations // per-epoch epochs
        total = max(1, recipe.iterations // per_epoch) * per_epoch
    return total


def planned_work(recipe: Recipe, n_train: int) -> tuple[int, int]:
    """(training images, validation rounds) of a run of `recipe` on `n_train` images that does
    not stop early, known before any image loads (what `train` will do; for cost estimates)."""
    batch = min(recipe.train_batch(n_train), n_train)
    per_epoch = steps_per_epoch(n_train, batch, recipe.drop_last)
    total = _total_steps(recipe, per_epoch)
    plan = _Plan(n_train, batch, total, recipe.eval_every or per_epoch)
    step, rounds = 0, 0
    while step < total:
        step, rounds = _round_end(step, plan, recipe, per_epoch), rounds + 1
    return images_before(total, per_epoch, batch, n_train), rounds


def _plan(recipe: Recipe, batches: _Batches, n_train: int) -> _Plan:
    total = _total_steps(recipe, batches.per_epoch)
    if total < FEW_STEPS:
        warnings.warn(MedfmWarning(
            f"{n_train} training images in batches of {batches.batch_size} make "
            f"{batches.per_epoch} optimizer step(s) per epoch, {total} in all: too few to "
            f"learn much; raise --epochs or lower --batch-size."), stacklevel=3)
    return _Plan(n_train, batches.batch_size, total, recipe.eval_every or batches.per_epoch)


def _round_end(step: int, plan: _Plan, recipe: Recipe, per_epoch: int) -> int:
    """The step after which the round starting at `step` validates: `round_steps` on, or with
    `eval_rounds` n the end of the next epoch e (of E) with e % (E // n) == 0, or of the last."""
    if not recipe.eval_rounds:
        return min(step + plan.round_steps, plan.total_steps)
    epochs = -(-plan.total_steps // per_epoch)  # a trailing partial epoch counts as one
    every = max(1, epochs // min(recipe.eval_rounds, epochs))
    epoch = step // per_epoch
    while epoch % every and epoch < epochs - 1:
        epoch += 1
    return min((epoch + 1) * per_epoch, plan.total_steps)


def _restore(saved: dict, model, optimizer, scheduler, recipe: Recipe,
             device: torch.device) -> TrainState:
    """Load a checkpoint of this plan into the RNGs, optimizer, scheduler and model, checking
    each part first; raises (having changed nothing but RNGs, which a fresh start reseeds) when
    a part does not fit."""
    state = TrainState(**saved["state"])
    weights = saved["model"]
    _check_state(model, weights, recipe)
    if not isinstance(saved["scheduler"], dict) or (
            set(saved["scheduler"]) != set(scheduler.state_dict())):
        raise ValueError("a scheduler state that does not fit")
    _restore_rng(saved["rng"], device)
    optimizer.load_state_dict(saved["optimizer"])  # checks its groups before changing any
    scheduler.load_state_dict(saved["scheduler"])
    load_model_state(model, weights, recipe)
    return state


def _resume(path: Path | None, plan: _Plan, model, optimizer, scheduler, seed: int,
            recipe: Recipe, device: torch.device) -> tuple[TrainState, bool]:
    """(state, resumed): the checkpoint's, restored into the model, optimizer, scheduler and
    RNGs when it belongs to this plan; else a fresh state with every RNG seeded."""
    saved = None
    if path is not None:
        remove_stale_temps(path.parent)
        saved = load_checkpoint(path)
    if saved is not None and saved.get("run", path.parent.name) != path.parent.name:
        set_aside(path, f"holds run {saved['run']}, not run {path.parent.name} (its folder's "
                        "name): it was copied here")
        saved = None
    if saved is not None and saved["plan"] == vars(plan):
        try:
            return _restore(saved, model, optimizer, scheduler, recipe, device), True
        except (AttributeError, IndexError, KeyError, RuntimeError, TypeError,
                ValueError) as exc:
            set_aside(path, f"does not fit this run ({type(exc).__name__}: {exc})")
    elif saved is not None:
        tqdm.write(f"{path}: checkpoint of another plan; starting afresh")
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return TrainState(), False


@dataclass
class _Loop:
    """Everything a training round touches."""

    model: torch.nn.Module
    recipe: Recipe
    loss_fn: TaskLoss
    prep: DevicePreprocessor
    batches: _Batches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    seed: int
    bar: tqdm
    compile_warmup_s: float | None = None  # compiled: the first step's seconds; None: not yet

    def run_steps(self, first: int, last: int) -> tuple[float, int, dict]:
        """Optimizer steps [first, last): (mean train loss, images seen, last lrs by group)."""
        _set_train_mode(self.model, self.recipe)
        loss_sum = torch.zeros((), device=self.device)
        seen, lrs = 0, {}
        t_first = time.perf_counter()
        for step in range(first, last):
            images, labels = self.batches(step)
            x = self.prep(images)  # (B, H, W[, 3]) uint8 -> (B, 3, S, S) float on device
            if self.recipe.augment:
                x = augment(x, self.seed, step)
            with _autocast(self.device):
                logits = self.model(x)  # (B, C) or (B, 1)
                loss = self.loss_fn(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.recipe.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], self.recipe.grad_clip)
            self.optimizer.step()
            if self.compile_warmup_s is None:  # compiled, first step: its compilation cost
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # once per run
                self.compile_warmup_s = time.perf_counter() - t_first
            lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
            self.scheduler.step()
            loss_sum += loss.detach() * len(images)
            seen += len(images)
            self.bar.update(len(images))
        return float(loss_sum) / max(seen, 1), seen, lrs  # one device sync per round

    def validate(self, val: Split, task: Task) -> dict[str, float]:
        """Validation loss, ACC and AUC of the current weights."""
        scores, loss = predict(self.model, val, prep=self.prep, loss=self.loss_fn,
                               batch_size=self.batches.batch_size * EVAL_BATCH_FACTOR)
        return {"loss": loss, "acc": acc_metric(_labels(val), scores, task),
                "auc": auc_metric(_labels(val), scores, task)}


def _record_round(state: TrainState, values: dict, *, select: str, monitor: str,
                  model: torch.nn.Module, recipe: Recipe) -> None:
    """Keep the best weights by `select`, count rounds without a `monitor` improvement."""
    if _is_better(values[select], state.best_value, select):
        state.best_value, state.best_round = values[select], state.round
        state.best_state = {k: v.detach().to("cpu", copy=True)
                            for k, v in model_state(model, recipe).items()}
    if _is_better(values[monitor], state.monitor_best, monitor):
        state.monitor_best, state.bad_rounds = values[monitor], 0
    else:
        state.bad_rounds += 1


def train(
    model: torch.nn.Module,
    *,
    recipe: Recipe,
    task: Task,
    train: Split,
    val: Split,
    preprocess: PreprocessConfig,
    device: torch.device,
    seed: int,
    primary_metric: str = "acc",
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    desc: str = "finetune",
    on_checkpoint: Callable[[int], None] | None = None,
    compile: bool = False,
) -> TrainOutcome:
    """Train `model` (a timm classifier with its head built) by `recipe`; see module docstring.

    `primary_metric` resolves the recipe's "primary" metric. With `checkpoint_dir` the run
    checkpoints after every round and resumes from `checkpoint_dir/last.pt` if one is there;
    the caller makes sure no other process writes that folder meanwhile (run.py locks it).
    `on_checkpoint(round)` is called after each checkpoint is written (1-based round).
    `compile` runs the model torch.compile-d (in place: its state dict and checkpoints keep
    their keys); the first step's seconds, compilation in them, are `compile_warmup_s`.
    """
    task = Task(task)
    select = primary_metric if recipe.select_metric == "primary" else recipe.select_metric
    monitor = primary_metric if recipe.monitor == "primary" else recipe.monitor
    model = model.to(device, memory_format=torch.channels_last)
    if recipe.lora_rank:
        mark_trainable(model)  # adapters (injected by lora.apply_lora) and head
    elif recipe.freeze_backbone:
        head_ids = _head_parameter_ids(model)
        for p in model.parameters():
            p.requires_grad_(id(p) in head_ids)
    batches = _Batches(train, recipe.train_batch(len(train)), seed, device,
                       drop_last=recipe.drop_last)
    plan = _plan(recipe, batches, len(train))
    optimizer = _optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        (lambda s: 1.0) if recipe.schedule_scope == "head" and group["name"] != "head" else
        (lambda s: lr_factor(s, plan.total_steps, recipe, batches.per_epoch))
        for group in optimizer.param_groups])
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    state, resumed = _resume(path, plan, model, optimizer, scheduler, seed, recipe, device)
    bar = tqdm(total=batches.images_before(plan.total_steps),
               initial=batches.images_before(state.step),
               unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    loss_fn = TaskLoss(task, recipe, recipe.label_smoothing, train_labels=_labels(train))
    if compile:
        model.compile(dynamic=False)
    loop = _Loop(model, recipe, loss_fn,
                 DevicePreprocessor(preprocess, device, channels_last=True), batches, optimizer,
                 scheduler, device, seed, bar, compile_warmup_s=None if compile else 0.0)
    try:
        while not state.done:
            t_round = time.perf_counter()
            last = _round_end(state.step, plan, recipe, batches.per_epoch)
            train_loss, seen, lrs = loop.run_steps(state.step, last)
            compute_s = time.perf_counter() - t_round
            values = loop.validate(val, task)
            state.step, state.round = last, state.round + 1
            state.train_images += seen
            state.train_compute_s += compute_s
            _record_round(state, values, select=select, monitor=monitor, model=model,
                          recipe=recipe)
            state.train_seconds += time.perf_counter() - t_round
            state.curves.append({
                "round": state.round, "step": last,
                "epoch": round(last / batches.per_epoch, 4),
                "train_loss": _finite(train_loss),
                **{f"val_{k}": _finite(float(v)) for k, v in values.items()},
                **{f"lr_{k}": v for k, v in lrs.items()},
                "img_s": round(seen / compute_s, 2) if compute_s > 0 else None,
                "seconds": round(time.perf_counter() - t_round, 3),
            })
            stop = bool(recipe.patience) and state.bad_rounds >= recipe.patience
            state.stopped_early = stop and last < plan.total_steps
            state.done = stop or last >= plan.total_steps
            bar.set_postfix_str(f"ep {last / batches.per_epoch:.1f} loss {train_loss:.3f} "
                                f"val_{select} {values[select]:.3f}")
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                save_checkpoint({"plan": vars(plan), "model": model_state(model, recipe),
                                 "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "state": vars(state),
                                 "rng": _rng_states(device), "run": path.parent.name}, path)
            if on_checkpoint is not None:
                on_checkpoint(state.round)
    finally:
        bar.close()

    load_model_state(model, state.best_state, recipe)
    model.eval()
    return TrainOutcome(
        model=model, best_round=state.best_round, best_value=float(state.best_value),
        selection=f"val_{select}", curves=state.curves, steps=state.step,
        stopped_early=state.stopped_early, resumed=resumed, train_seconds=state.train_seconds,
        images_per_s=(state.train_images / state.train_compute_s
                      if state.train_compute_s > 0 else 0.0),
        compile_warmup_s=loop.compile_warmup_s or 0.0,
        train_images=state.train_images, train_compute_s=state.train_compute_s,
    )


def _labels(split: Split) -> np.ndarray:
    """The labels of the rows a split uses, (N, L)."""
    return np.asarray(split.labels if split.rows is None else split.labels[split.rows])
