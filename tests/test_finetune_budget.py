"""The `medfm` recipe's step budget (issue 14): every subset size gets a comparable amount of
optimization, validation at a fixed number of steps, the checkpoint chosen on val loss; the
published protocols and the old `medfm` (now `medfm-v1`) keep their keys and schedules."""

from __future__ import annotations

import numpy as np
import pytest

from medfm.resolve.recipes import RECIPES, resolve_recipe
from medfm.finetune import finetune_job
from medfm.resolve.finetune import resolve_finetune
from medfm.resolve.recipes import LATER_FIELDS, MIN_TRAIN_BATCH
from medfm.sampling import SubsetSpec

BUDGET_FIELDS = ("revision", "min_steps", "epoch_steps")  # what issue 14 added to Recipe
# `medfm` as every row before issue 14 keyed it (what `medfm-v1` must still build)
MEDFM_V1_KEY = {
    "name": "medfm", "epochs": 30, "iterations": 0, "batch_size": 64, "optimizer": "adamw",
    "lr_head": 0.001, "lr_backbone": 0.0001, "weight_decay": 0.05, "schedule": "cosine",
    "warmup": 0.05, "milestones": [], "gamma": 1.0, "decay_every": 1, "label_smoothing": 0.1,
    "augment": True, "grad_clip": 1.0, "eval_every": 0, "select_metric": "primary",
    "patience": 10, "monitor": "primary", "binary_head": "ce2", "freeze_backbone": False,
    "pretrained": True, "stem": "default",
}


@pytest.mark.parametrize("fraction, n_train, batch", [(0.01, 5, 5), (1.0, 546, 64)])
def test_the_budget_holds_for_5_images_and_for_the_full_split(real_root, tmp_path, fraction,
                                                              n_train, batch):
    """Real BreastMNIST: 5 images (one batch of 5 per epoch) and the whole split (9 steps per
    epoch) both train for the minimum number of steps although 2 epochs would be 2 and 18
    steps, validated every 10 steps, and test the round with the lowest val loss (the
    default budget, 300 steps every 25, is the same code at a size too slow for a test)."""
    recipe = resolve_recipe("medfm", resize_policy="native", augment=False, epochs=2,
                            min_steps=60, eval_every=10)
    request = resolve_finetune(dataset="breastmnist", size=28, backbone="test_resnet",
                               weights="random", spec=SubsetSpec(fraction=fraction, seed=0),
                               recipe=recipe, data_root=real_root)
    row, _, _ = finetune_job(request, device="cpu", workdir=tmp_path, progress=False)
    assert row.n_train == n_train
    assert row.extra["train_batch"] == batch
    assert row.extra["steps"] == 60
    curves = row.extra["curves"]
    assert [c["step"] for c in curves] == list(range(10, 61, 10))
    losses = [c["val_loss"] for c in curves]
    assert row.extra["best_round"] == int(np.argmin(losses)) + 1
    assert row.key.select_metric == "loss"


def test_tiny_subsets_get_smaller_batches_and_large_ones_keep_theirs():
    medfm, old = RECIPES["medfm"], RECIPES["medfm-v1"]
    assert [medfm.train_batch(n) for n in (3, 5, 20, 55, 164, 256, 546, 4708)] == \
        [3, 5, MIN_TRAIN_BATCH, 14, 41, 64, 64, 64]
    assert [old.train_batch(n) for n in (5, 55, 546)] == [5, 55, 64]
    # steps: 30 epochs, but at least 300 (old: 30 epochs, whatever they hold)
    assert [medfm.total_steps(p) for p in (1, 4, 9, 74)] == [300, 300, 300, 2220]
    assert [old.total_steps(p) for p in (1, 4, 9, 74)] == [30, 120, 270, 2220]


def test_epochs_on_the_command_line_mean_passes_not_a_budget():
    r = resolve_recipe("medfm", epochs=3)
    assert (r.min_steps, r.eval_every, r.total_steps(5)) == (0, 0, 15)
    assert resolve_recipe("medfm", epochs=3, min_steps=50).total_steps(5) == 50


def test_old_medfm_keys_are_medfm_v1_and_published_presets_key_no_budget():
    assert RECIPES["medfm-v1"].key_params() == MEDFM_V1_KEY
    new = RECIPES["medfm"].key_params()
    assert new != MEDFM_V1_KEY and new["revision"] == 2 and new["select_metric"] == "loss"
    for name in ("seed-paper", "medmnist-plus", "medmnist-v2"):
        recipe = RECIPES[name]
        assert not set(BUDGET_FIELDS) & set(recipe.key_params()), name
        assert all(getattr(recipe, f) == LATER_FIELDS[f] for f in BUDGET_FIELDS), name
        per_epoch = 9
        expected = recipe.iterations or recipe.epochs * per_epoch  # their schedules as before
        assert recipe.total_steps(per_epoch) == expected
        assert recipe.train_batch(55) == min(recipe.batch_size, 55)


def test_medfm_backbone_lr_is_the_sweeps_for_cnns_and_kept_for_transformers():
    """The sweep (docs/reproduction.md) chose backbone lr 1e-3 on a CNN; a backbone with
    attention layers keeps 1e-4 (not swept). An explicit `--set lr_backbone=X` is every
    backbone's."""
    import timm

    from medfm.finetune.train import _optimizer

    def backbone_lr(arch, recipe):
        groups = _optimizer(timm.create_model(arch, num_classes=2), recipe).param_groups
        return {g["name"]: g["lr"] for g in groups}["backbone"]

    medfm = resolve_recipe("medfm")
    assert backbone_lr("test_resnet", medfm) == 1e-3
    assert backbone_lr("test_vit", medfm) == 1e-4
    assert backbone_lr("test_resnet", RECIPES["medfm-v1"]) == backbone_lr(
        "test_vit", RECIPES["medfm-v1"]) == 1e-4
    asked = resolve_recipe("medfm", lr_backbone="3e-5")
    assert backbone_lr("test_resnet", asked) == backbone_lr("test_vit", asked) == 3e-5
    # a preset's own transformer lr is dropped only when the backbone lr is asked for
    assert resolve_recipe("seed-paper", lr_head="1e-2").lr_backbone_vit == 1e-7


def test_medfm_trains_its_whole_budget_and_tests_its_lowest_val_loss():
    """No early stop in the default (docs/reproduction.md: a 300-step patience cut full
    PneumoniaMNIST runs short while the lr was high); early stopping stays one setting away."""
    medfm = RECIPES["medfm"]
    assert medfm.patience == 0 and medfm.select_metric == medfm.monitor == "loss"
    assert medfm.key_params()["patience"] == 0  # rows of the 12-validation patience stay apart
    assert resolve_recipe("medfm", patience="12").patience == 12

