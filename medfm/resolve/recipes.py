"""Fine-tuning recipes: one frozen dataclass of training settings, and the published presets.

    from medfm.resolve.recipes import resolve_recipe
    recipe = resolve_recipe("medmnist-v2", epochs="10")       # CLI strings are parsed per field
    recipe = resolve_recipe("medfm", freeze_backbone=True)     # a head trained through a frozen net

Presets (numbers from docs/ANCHORS.md):

- `medfm` (revision 2, since issue 14): our default for pretrained backbones: AdamW at lr 1e-3
  for head and backbone (a backbone with attention layers: 1e-4, as before; the sweep ran a
  CNN only), cosine schedule with 5% linear warm-up, label smoothing 0.1, flips
  and small affine augmentation, gradient clipping at 1.0, 30 epochs of batch 64 but at least
  300 optimizer steps, and at least 4 steps per epoch (the batch shrinks for tiny subsets, to 8
  images or the whole subset); validated every 25 steps, the checkpoint with the lowest val loss
  is tested; no early stop by default (`patience=12` stops after 12 validations, 300 steps,
  without a lower val loss: that cut full PneumoniaMNIST runs short while the lr was high).
  Why these values: the sweep in docs/reproduction.md.
- `medfm-v1`: `medfm` before issue 14 (its rows keep their keys and read as revision 1): 30
  epochs of batch 64, validated once per epoch, best checkpoint by the dataset's primary
  metric, early stop after 10 epochs without improvement.
- `seed-paper` (Wu & Papiez 2025, code FMMIC/SFT): 15,000 iterations of batch 64 rounded down
  to whole epochs of full batches, AdamW head lr 1e-3 and weight decay 1e-2 decayed x0.9 every
  200 iterations, backbone lr constant at 1e-6 (CNNs) or 1e-7 (backbones with attention), no
  augmentation, bilinear upsampling, binary tasks as 1 logit + BCE, timm's own head init, about
  ten validations, best checkpoint by validation ACC; a frozen backbone stays in train mode.
- `medmnist-plus` (Doerrich et al. 2025): AdamW lr 1e-4 with timm's per-epoch cosine, <= 100
  epochs of batch 64, early stop at patience 5 on validation loss, images normalized, then
  zero-padded into a 224 canvas, timm's own head init; a frozen backbone stays in train mode.

docs/presets.md lists every protocol detail of the published presets with the line of the
reference code it comes from; medfm.resolve.presets adds their per-backbone rules (input size,
batch).
- `medmnist-v2` (Yang et al. 2023): from scratch, Adam lr 1e-3, batch 128, 100 epochs, lr x0.1 at
  epochs 50 and 75, mean = std = 0.5, no augmentation, best checkpoint by validation AUC, images at
  their own size with the CIFAR-style ResNet stem (3x3 conv, stride 1, no max-pool).

Overriding `epochs` on an iteration-based recipe (seed-paper) switches it to epochs, validated
once per epoch, and on a recipe with a step budget (`medfm`) drops the budget (`min_steps`) and
validates once per epoch, so `--epochs N` means N passes over the data for every preset (the
batch still shrinks for tiny subsets, `epoch_steps`).

LoRA (`lora_rank` > 0, any preset with pretrained weights): low-rank adapters (peft) on the
backbone's layers chosen by `lora_targets` (medfm.finetune.lora), trained at `lora_lr` with the
new head; every pretrained weight and BatchNorm statistic stays frozen. Such a run is its own
method, "lora", and its key holds the four LoRA fields; a run without adapters keys none of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

from medfm.errors import InvalidArgumentError
from medfm.limits import (EPOCHS_MAX, INPUT_SIZE_MAX, ITERATIONS_MAX, LORA_RANK_MAX,
                          check_at_most, check_batch_size)
from medfm.preprocess import NORMALIZATIONS, RESIZE_POLICIES, PreprocessRequest
from medfm.resolve.defaults import drop_unchanged, later_defaults

OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "step", "exp", "constant", "cosine-epoch")  # cosine-epoch: timm's
# CosineLRScheduler stepped once per epoch (MedMNIST+): epoch e runs at cos(pi * (e - 1) / E)
SCHEDULE_SCOPES = ("all", "head")  # which lrs the schedule scales; head: the backbone's is constant
CLASS_WEIGHTS = ("none", "balanced")  # balanced: each class's loss weighted n / (K * n_class)
HEAD_INITS = ("small", "timm")  # new head: N(0, 0.01) and zero bias, or the model's own init
CHECKPOINT_METRICS = ("primary", "acc", "auc", "loss")  # primary: the dataset's (ChestMNIST: AUC)
BINARY_HEADS = ("ce2", "bce1")  # binary tasks: 2 logits + cross-entropy, or 1 logit + BCE
STEMS = ("default", "cifar")  # cifar: ResNet conv1 -> 3x3 stride 1, max-pool removed
PREPROCESS_FIELDS = ("resize_policy", "input_size", "normalize")  # the recipe's preprocessing
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
NONE_WORDS = ("", "none", "null", "default")
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_lr")
LORA_RANK = 8  # the rank `--lora` (or finetune(lora=True)) gives a recipe without one
LORA_AUTO = "auto"  # lora_targets: each backbone family's default layers (lora.py)
METHODS = ("finetune", "lora")  # how fine-tunes are recorded: whole (or frozen) backbone, LoRA
# Fields added after result keys were first written, with the value that means "as before"
# (medfm.resolve.defaults.LATER_KEY_FIELDS, scope "recipe"): a recipe keys such a field only when
# it differs from that value, so old work directories recompute nothing.
LATER_FIELDS: dict[str, object] = later_defaults("recipe")
MIN_TRAIN_BATCH = 8  # epoch_steps shrinks the batch down to this (or the whole subset), no lower


@dataclass(frozen=True)
class Recipe:
    """Every setting of a fine-tuning run; the resolved recipe is stored with each result."""

    name: str  # preset this recipe started from
    epochs: int  # passes over the training subset (used when iterations == 0)
    iterations: int  # optimizer steps in total; 0 = run `epochs` epochs instead
    batch_size: int  # training images per step (capped at the subset size)
    optimizer: str  # one of OPTIMIZERS
    lr_head: float  # peak learning rate of the classifier head
    lr_backbone: float  # peak learning rate of everything but the head
    weight_decay: float  # AdamW decoupled decay; Adam: L2 penalty
    schedule: str  # one of SCHEDULES: cosine (+ warmup), step (milestones), exp (every N steps)
    warmup: float  # cosine: share of all steps spent warming up linearly from 0
    milestones: tuple[float, ...]  # step: lr *= gamma at these shares of all steps
    gamma: float  # step and exp: multiplicative lr decay
    decay_every: int  # exp: steps between two decays
    label_smoothing: float  # CE label smoothing; BCE targets pulled towards 0.5 by as much
    augment: bool  # random horizontal flips and small affine warps, on the device
    grad_clip: float  # max global gradient norm; 0 = no clipping
    eval_every: int  # steps between validations (and checkpoints); 0 = once per epoch
    select_metric: str  # one of CHECKPOINT_METRICS: picks the checkpoint that is tested
    patience: int  # stop after this many validations without improvement; 0 = never
    monitor: str  # one of CHECKPOINT_METRICS: what early stopping watches
    binary_head: str  # one of BINARY_HEADS
    freeze_backbone: bool  # train the head only; the frozen backbone in eval mode (BN statistics
    #                        fixed) unless frozen_train_mode
    pretrained: bool  # False: random init (weights="random"), as the from-scratch baselines
    resize_policy: str | None  # one of preprocess.RESIZE_POLICIES; None = the backbone's default
    input_size: int | None  # model input side; None = the backbone's (or the source size, native)
    normalize: str  # one of NORMALIZATIONS
    stem: str  # one of STEMS
    lora_rank: int  # rank of the LoRA adapters; 0 = none (the backbone trains in full, or frozen)
    lora_alpha: float  # adapters' updates are scaled by lora_alpha / lora_rank
    lora_dropout: float  # dropout on the adapters' input while training, in [0, 1)
    lora_targets: str  # LORA_AUTO, or comma-separated module names (or name endings) to adapt
    lora_lr: float  # peak learning rate of the adapters (the head keeps lr_head)
    # added later (LATER_FIELDS): each default runs as medfm did before the field existed
    schedule_scope: str = "all"  # one of SCHEDULE_SCOPES
    lr_backbone_vit: float | None = None  # lr_backbone of a backbone with attention layers (ViT,
    #                                       CLIP, EVA, DINO, SAM); None: lr_backbone
    drop_last: bool = False  # drop every partial batch (else only a trailing batch of one image)
    whole_epochs: bool = False  # `iterations` rounded down to whole epochs
    eval_rounds: int = 0  # validate after epochs e with e % (E // n) == 0 and after the last
    #                       (of E epochs; the seed paper's n = 10); 0: every `eval_every` steps
    head_init: str = "small"  # one of HEAD_INITS
    frozen_train_mode: bool = False  # freeze_backbone: the frozen backbone in train mode
    #                                  (BatchNorm statistics move, dropout on), as both references
    revision: int = 1  # of the preset `name`: 2 = `medfm` since issue 14 (1: `medfm-v1`)
    min_steps: int = 0  # epoch-based runs take at least this many optimizer steps in all
    epoch_steps: int = 0  # the batch shrinks (to MIN_TRAIN_BATCH at least) so that an epoch has
    #                       at least this many steps; 0: batch_size as it is
    class_weight: str = "none"  # one of CLASS_WEIGHTS: "balanced" weights each class (each label's
    #                             positives and negatives) by n / (K * its count in the subset)

    def __post_init__(self) -> None:
        """Check every choice and range, so a bad recipe fails before any data or model loads."""
        for item in dataclasses.fields(self):  # NaN and inf pass every range check below
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidArgumentError(
                    f"recipe field {item.name} must be a finite number; got {value}.")
        for name, choices in (
            ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
            ("select_metric", CHECKPOINT_METRICS),
            ("monitor", CHECKPOINT_METRICS), ("binary_head", BINARY_HEADS),
            ("normalize", NORMALIZATIONS), ("stem", STEMS),
            ("schedule_scope", SCHEDULE_SCOPES), ("head_init", HEAD_INITS),
            ("class_weight", CLASS_WEIGHTS),
        ):
            if getattr(self, name) not in choices:
                raise InvalidArgumentError(
                    f"recipe field {name}={getattr(self, name)!r} is not one of "
                    f"{', '.join(choices)}."
                )
        if self.resize_policy is not None and self.resize_policy not in RESIZE_POLICIES:
            raise InvalidArgumentError(
                f"recipe field resize_policy={self.resize_policy!r} is not one of "
                f"{', '.join(RESIZE_POLICIES)} (or none for the backbone's default)."
            )
        positive = {"batch_size": self.batch_size, "lr_head": self.lr_head,
                    "decay_every": self.decay_every, "revision": self.revision}
        if self.iterations == 0:
            positive["epochs"] = self.epochs
        if self.input_size is not None:
            positive["input_size"] = self.input_size
        non_negative = {"iterations": self.iterations, "lr_backbone": self.lr_backbone,
                        "weight_decay": self.weight_decay, "grad_clip": self.grad_clip,
                        "eval_every": self.eval_every, "patience": self.patience,
                        "epochs": self.epochs, "eval_rounds": self.eval_rounds,
                        "lr_backbone_vit": self.lr_backbone_vit or 0.0,
                        "min_steps": self.min_steps, "epoch_steps": self.epoch_steps}
        for name, value in positive.items():
            if value <= 0:
                raise InvalidArgumentError(f"recipe field {name} must be > 0; got {value}.")
        for name, limit in (("epochs", EPOCHS_MAX), ("iterations", ITERATIONS_MAX),
                            ("lora_rank", LORA_RANK_MAX)):
            check_at_most(getattr(self, name), limit, f"recipe field {name}")
        if self.input_size is not None:
            check_at_most(self.input_size, INPUT_SIZE_MAX, "recipe field input_size")
        check_batch_size(self.batch_size, self.input_size, "recipe field batch_size")
        for name, value in non_negative.items():
            if value < 0:
                raise InvalidArgumentError(f"recipe field {name} must be >= 0; got {value}.")
        for name in ("warmup", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InvalidArgumentError(
                    f"recipe field {name} must be in [0, 1); got {getattr(self, name)}.")
        if not 0.0 < self.gamma <= 1.0:
            raise InvalidArgumentError(f"recipe field gamma must be in (0, 1]; got {self.gamma}.")
        if self.lora_rank < 0 or self.lora_alpha <= 0 or self.lora_lr <= 0:
            raise InvalidArgumentError(
                f"recipe fields lora_rank >= 0, lora_alpha > 0 and lora_lr > 0; got "
                f"{self.lora_rank}, {self.lora_alpha} and {self.lora_lr}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InvalidArgumentError(
                f"recipe field lora_dropout must be in [0, 1); got {self.lora_dropout}.")
        if self.lora_rank:
            self._check_lora()
        if any(not 0.0 < m < 1.0 for m in self.milestones):
            raise InvalidArgumentError(
                f"recipe field milestones are shares of training in (0, 1), e.g. 0.5,0.75; "
                f"got {self.milestones}.")

    def _check_lora(self) -> None:
        """LoRA adapts pretrained weights that stay as they are: nothing else may train them."""
        if not self.lora_targets.strip(" ,"):
            raise InvalidArgumentError(
                f"recipe field lora_targets is empty; use {LORA_AUTO!r} or module names.")
        for clash, why in (
            (self.freeze_backbone, "freezes the backbone already; drop freeze_backbone"),
            (not self.pretrained, "adapts pretrained weights, but this recipe trains from "
                                  "scratch (pretrained=false); pick another recipe"),
            (self.stem != "default", "keeps the backbone's own layers; the cifar stem is a new, "
                                     "untrained one: override stem=default"),
        ):
            if clash:
                raise InvalidArgumentError(f"LoRA (lora_rank={self.lora_rank}) {why}.")

    def train_batch(self, n_train: int) -> int:
        """Images per optimizer step for a training subset of `n_train` images: batch_size,
        capped at the subset, and with `epoch_steps` shrunk (to MIN_TRAIN_BATCH at least) so an
        epoch has at least that many steps (55 images, batch 64, epoch_steps 4 -> 14)."""
        batch = min(self.batch_size, n_train)
        if self.epoch_steps:
            batch = min(batch, max(MIN_TRAIN_BATCH, -(-n_train // self.epoch_steps)))
        return max(1, batch)

    def total_steps(self, per_epoch: int) -> int:
        """Optimizer steps of a run whose epochs have `per_epoch` steps: `iterations`, or
        `epochs` epochs but at least `min_steps`."""
        return self.iterations or max(self.min_steps, self.epochs * per_epoch)

    @property
    def method(self) -> str:
        """The paradigm a run of this recipe is recorded as: "lora" with adapters, else
        "finetune" (a frozen backbone is a fine-tune setting, `freeze_backbone`)."""
        return METHODS[1] if self.lora_rank else METHODS[0]

    def to_params(self) -> dict:
        """The recipe as a plain dict (JSON-ready)."""
        params = dataclasses.asdict(self)
        params["milestones"] = list(self.milestones)
        return params

    def key_params(self) -> dict:
        """What a result's `params` records: every field but the preprocessing, which the key
        holds resolved (resize policy, input size, normalization), and the LoRA fields only for
        a LoRA recipe (so the keys of runs without adapters are those of earlier medfm), and a
        LATER_FIELDS field only where it is not its "as before" value."""
        left_out = PREPROCESS_FIELDS + (() if self.lora_rank else LORA_FIELDS)
        return drop_unchanged({k: v for k, v in self.to_params().items() if k not in left_out},
                              "recipe")

    @property
    def preprocess(self) -> PreprocessRequest:
        """The recipe's preprocessing, as a request the user's own can override."""
        return PreprocessRequest(self.resize_policy, self.input_size, self.normalize)

    def with_preprocess(self, request: PreprocessRequest) -> Recipe:
        """This recipe with `request`'s preprocessing fields (None stays None)."""
        return dataclasses.replace(self, resize_policy=request.resize_policy,
                                   input_size=request.input_size,
                                   normalize=request.normalize or "backbone")


_MEDFM = Recipe(
    name="medfm", epochs=30, iterations=0, batch_size=64, optimizer="adamw", lr_head=1e-3,
    lr_backbone=1e-4, weight_decay=0.05, schedule="cosine", warmup=0.05, milestones=(),
    gamma=1.0, decay_every=1, label_smoothing=0.1, augment=True, grad_clip=1.0, eval_every=0,
    select_metric="primary", patience=10, monitor="primary", binary_head="ce2",
    freeze_backbone=False, pretrained=True, resize_policy=None, input_size=None,
    normalize="backbone", stem="default", lora_rank=0, lora_alpha=16.0, lora_dropout=0.1,
    lora_targets=LORA_AUTO, lora_lr=1e-3,
)

# `medfm` since issue 14 (docs/reproduction.md, the sweep): a budget in optimizer steps that
# every subset size gets (smaller batches for tiny subsets, at least 300 steps), validation
# every 25 steps, the checkpoint chosen on the (smooth) val loss, and the backbone
# lr the sweep chose (1e-5 .. 3e-3 on Lite0: AUC rises to 1e-3 and plateaus to 3e-3; 1e-3 has
# the best balanced accuracy at 10%; transformers, not swept, keep the earlier 1e-4). No early
# stop: on full PneumoniaMNIST the val loss reached new minima up to 375 steps apart while the
# lr was high, and a 300-step patience ended runs at 500-975 of 2,220 steps (ACC -1.4 against
# medfm-v1 on the GPU); the whole budget, tested at its lowest val loss, lost nothing in the
# runs that compared it (a budget of 300 steps never stopped early anyway)
_MEDFM_V2 = dataclasses.replace(
    _MEDFM, revision=2, min_steps=300, epoch_steps=4, eval_every=25, select_metric="loss",
    monitor="loss", patience=0, lr_backbone=1e-3, lr_backbone_vit=1e-4,
)

RECIPES: dict[str, Recipe] = {
    "medfm": _MEDFM_V2,
    "medfm-v1": _MEDFM,  # `medfm` before issue 14 (epochs of batch 64, best val primary metric)
    # every value as FMMIC/SFT runs it (docs/presets.md: the file and line of each)
    "seed-paper": dataclasses.replace(
        _MEDFM, name="seed-paper", epochs=0, iterations=15_000, lr_backbone=1e-6,
        lr_backbone_vit=1e-7, weight_decay=1e-2, schedule="exp", schedule_scope="head",
        warmup=0.0, gamma=0.9, decay_every=200, label_smoothing=0.0, augment=False,
        grad_clip=0.0, eval_every=0, eval_rounds=10, select_metric="acc", patience=0,
        monitor="acc", binary_head="bce1", resize_policy="bilinear", drop_last=True,
        whole_epochs=True, head_init="timm", frozen_train_mode=True,
    ),
    # as rethinking-model-prototyping-MedMNISTPlus runs it (docs/presets.md)
    "medmnist-plus": dataclasses.replace(
        _MEDFM, name="medmnist-plus", epochs=100, lr_head=1e-4, lr_backbone=1e-4,
        weight_decay=1e-2, schedule="cosine-epoch", warmup=0.0, label_smoothing=0.0,
        augment=False, grad_clip=0.0, select_metric="loss", patience=5, monitor="loss",
        resize_policy="pad-norm", input_size=224, head_init="timm", frozen_train_mode=True,
    ),
    "medmnist-v2": dataclasses.replace(
        _MEDFM, name="medmnist-v2", epochs=100, batch_size=128, optimizer="adam",
        lr_head=1e-3, lr_backbone=1e-3, weight_decay=0.0, schedule="step", warmup=0.0,
        milestones=(0.5, 0.75), gamma=0.1, label_smoothing=0.0, augment=False, grad_clip=0.0,
        select_metric="auc", patience=0, monitor="auc", pretrained=False,
        resize_policy="native", normalize="half", stem="cifar",
    ),
}

_FIELDS = {f.name: f.type for f in dataclasses.fields(Recipe)}


def _parse(name: str, value: object, kind: str) -> object:
    """`value` (a Python value, or a string from the command line) as field `name`'s type."""
    optional = kind.endswith("| None")
    base = kind.removesuffix(" | None")
    if optional and (value is None or (isinstance(value, str) and value.lower() in NONE_WORDS)):
        return None
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
                return value.lower() in TRUE_WORDS
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if not isinstance(value, str):
                raise ValueError
            if name == "lora_targets":
                return lora_targets(value)
            return value.strip().lower()
        if base == "tuple[float, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(float(v) for v in items if str(v).strip())
    except (TypeError, ValueError):
        pass
    raise InvalidArgumentError(f"recipe field {name}={value!r} is not a valid {kind}.")


def lora_targets(value: str) -> str:
    """`lora_targets` spelled one way: LORA_AUTO, or the module names sorted, comma-separated
    (their order does not change a run; their case does)."""
    names = sorted({n.strip() for n in value.split(",") if n.strip()})
    if [n.lower() for n in names] == [LORA_AUTO]:
        return LORA_AUTO
    return ",".join(names)


def resolve_recipe(name: str | Recipe, **overrides: object) -> Recipe:
    """The preset `name` (or a Recipe) with `overrides` applied, each parsed and validated.

    Unknown presets or fields raise InvalidArgumentError with the closest names. Overriding
    `epochs` (and not `iterations`) on an iteration-based recipe switches it to epochs, validated
    once per epoch (unless `eval_every` or `eval_rounds` is overridden too). Overriding
    `lr_backbone` (and not `lr_backbone_vit`) sets the backbone lr of every backbone, attention
    layers or not.
    """
    if isinstance(name, Recipe):
        base = name
    else:
        key = str(name).strip().lower()
        if key not in RECIPES:
            close = difflib.get_close_matches(key, RECIPES, n=2, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise InvalidArgumentError(
                f"unknown recipe {name!r}.{hint} Known: {', '.join(RECIPES)}.")
        base = RECIPES[key]
    changes = {}
    for field, value in overrides.items():
        if field not in _FIELDS or field == "name":
            close = difflib.get_close_matches(field, _FIELDS, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise InvalidArgumentError(
                f"unknown recipe field {field!r}.{hint} Fields: "
                f"{', '.join(f for f in _FIELDS if f != 'name')}.")
        changes[field] = _parse(field, value, _FIELDS[field])
    if "epochs" in changes and "iterations" not in changes and base.iterations:
        changes["iterations"] = 0
        changes.setdefault("eval_every", 0)
        changes.setdefault("eval_rounds", 0)
    if "lr_backbone" in changes:  # the backbone lr asked for is every backbone's (a preset's
        changes.setdefault("lr_backbone_vit", None)  # own lr for transformers is dropped)
    if "epochs" in changes and base.min_steps:  # a step budget (medfm): N epochs mean N passes
        changes.setdefault("min_steps", 0)
        changes.setdefault("eval_every", 0)
    return dataclasses.replace(base, **changes)

