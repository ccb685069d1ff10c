"""Fine-tune stage: recipes, schedules, losses, augmentation, stems, the loop, resume, registry.

Real tiny timm models (`test_resnet`, `test_efficientnet`) with seeded random weights, trained for
1-3 epochs on small synthetic MedMNIST files at 28 px, on the CPU.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from medfm.backbones import create_backbone
from medfm.data import SPLITS, Task, get_dataset
from medfm.errors import InvalidArgumentError, MedfmError, MedfmWarning
from medfm.resolve.recipes import RECIPES, resolve_recipe
from medfm.finetune import finetune, finetune_job
from medfm.resolve.finetune import resolve_finetune
from medfm.finetune.run import BEST_WEIGHTS_NAME, CHECKPOINTS_DIR, LOCK_NAME
from medfm.preprocess import PreprocessRequest
from medfm.finetune.train import TaskLoss, apply_cifar_stem, augment, lr_factor, output_dim
from medfm.sampling import SubsetSpec
from medfm.store.registry import Registry
from medfm.synthetic import synthetic_arrays

N_SPLITS = (48, 16, 24)  # train, val, test rows of the synthetic files
FAST = dict(epochs=2, batch_size=16, resize_policy="native", augment=False)  # seconds per job


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Synthetic npz files whose three splits share one class pattern, so training can learn."""
    root = tmp_path_factory.mktemp("finetune-data")
    for flag in ("breastmnist", "chestmnist", "bloodmnist", "retinamnist"):
        images, labels = synthetic_arrays(flag, 28, sum(N_SPLITS), seed=1)
        bounds = np.cumsum((0, *N_SPLITS))
        arrays = {}
        for split, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[lo:hi], labels[lo:hi]
        np.savez(root / get_dataset(flag).filename(28), **arrays)
    return root


def _request(data_root, *, recipe, dataset="breastmnist", backbone="test_resnet", seed=0,
             weights="random", fraction=1.0, preprocess=None):
    return resolve_finetune(dataset=dataset, size=28, backbone=backbone, weights=weights,
                            spec=SubsetSpec(fraction=fraction, seed=seed), recipe=recipe,
                            preprocess=preprocess, data_root=data_root)


def _job(data_root, workdir, *, dataset="breastmnist", backbone="test_resnet", seed=0,
         recipe="medfm", on_checkpoint=None, **overrides):
    request = _request(data_root, dataset=dataset, backbone=backbone, seed=seed,
                       recipe=resolve_recipe(recipe, **{**FAST, **overrides}))
    return finetune_job(request, device="cpu", workdir=workdir, progress=False,
                        on_checkpoint=on_checkpoint)


# -- recipes --------------------------------------------------------------------------------

def test_the_package_exports_the_train_function_not_its_module():
    """`medfm.finetune.train` is both a module and the function it exports: the package's name
    is the function, whichever name is imported first (the API in the module docstring)."""
    import subprocess
    import sys

    code = ("from medfm.finetune import Split, resolve_recipe, train; "
            "assert callable(train) and train.__name__ == 'train', train; "
            "from medfm.finetune import finetune; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == "ok", run.stderr
    # the other order: the run module (which imports the train module) first
    code = ("import medfm.finetune.run; from medfm.finetune import train; "
            "from medfm.finetune.train import CHECKPOINT_NAME; "
            "assert callable(train) and train.__name__ == 'train', train; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == "ok", run.stderr


def test_presets_carry_the_published_protocols():
    v2 = RECIPES["medmnist-v2"]
    assert (v2.optimizer, v2.lr_head, v2.batch_size, v2.epochs) == ("adam", 1e-3, 128, 100)
    assert (v2.schedule, v2.milestones, v2.gamma) == ("step", (0.5, 0.75), 0.1)
    assert (v2.pretrained, v2.stem, v2.select_metric, v2.normalize) == (
        False, "cifar", "auc", "half")
    seed = RECIPES["seed-paper"]
    assert (seed.iterations, seed.batch_size, seed.binary_head, seed.gamma, seed.decay_every) == (
        15_000, 64, "bce1", 0.9, 200)
    plus = RECIPES["medmnist-plus"]
    assert (plus.resize_policy, plus.input_size, plus.patience, plus.monitor) == (
        "pad-norm", 224, 5, "loss")


def test_overrides_parse_command_line_strings():
    r = resolve_recipe("medfm", epochs="3", lr_head="2e-3", augment="false",
                       milestones="0.3,0.6", input_size="none", freeze_backbone="yes")
    assert (r.epochs, r.lr_head, r.augment, r.milestones, r.input_size, r.freeze_backbone) == (
        3, 2e-3, False, (0.3, 0.6), None, True)
    assert r.name == "medfm" and RECIPES["medfm"].epochs == 30  # presets stay untouched
    switched = resolve_recipe("seed-paper", epochs=2)
    assert (switched.iterations, switched.epochs, switched.eval_every) == (0, 2, 0)


@pytest.mark.parametrize("name, overrides, words", [
    ("medfm", {"epoch": 3}, "did you mean epochs"),
    ("medfm", {"epochs": "three"}, "not a valid int"),
    ("medfm", {"optimizer": "sgd"}, "adamw, adam"),
    ("medfm", {"binary_head": "bce2"}, "ce2, bce1"),
    ("medfm", {"warmup": 1.5}, "[0, 1)"),
    ("medfm", {"resize_policy": "stretch"}, "bilinear"),
    ("medmnst-v2", {}, "did you mean medmnist-v2"),
])
def test_bad_recipes_raise_clear_errors(name, overrides, words):
    with pytest.raises(InvalidArgumentError, match="(?i)" + re.escape(words)):
        resolve_recipe(name, **overrides)


# -- schedules, losses, augmentation, stems --------------------------------------------------

def test_schedules():
    cosine = resolve_recipe("medfm", warmup=0.1)
    factors = [lr_factor(s, 100, cosine) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] < 1e-3
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))  # decays
    v2 = RECIPES["medmnist-v2"]
    assert [lr_factor(s, 100, v2) for s in (49, 50, 74, 75)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01])
    seed = RECIPES["seed-paper"]
    assert [lr_factor(s, 15_000, seed) for s in (199, 200, 400)] == pytest.approx(
        [1.0, 0.9, 0.81])


def test_losses_and_scores_per_task():
    torch.manual_seed(0)
    medfm, bce1 = RECIPES["medfm"], resolve_recipe("medfm", binary_head="bce1")
    logits = torch.randn(6, 3)
    y = torch.tensor([[0], [1], [2], [0], [1], [2]])
    multi = TaskLoss(Task.MULTI_CLASS, medfm, smoothing=0.0)
    assert multi(logits, y) == pytest.approx(float(F.cross_entropy(logits, y[:, 0])))
    assert torch.allclose(multi.scores(logits).sum(1), torch.ones(6))

    labels = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    multilabel = TaskLoss(Task.MULTI_LABEL, medfm, smoothing=0.0)
    assert multilabel(logits, labels) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, labels.float())))
    assert torch.allclose(multilabel.scores(logits), torch.sigmoid(logits))

    assert output_dim(Task.BINARY, 2, bce1) == 1 and output_dim(Task.BINARY, 2, medfm) == 2
    one = logits[:, :1]
    binary = TaskLoss(Task.BINARY, bce1, smoothing=0.0)
    yb = torch.tensor([[0], [1], [1], [0], [1], [0]])
    assert binary(one, yb) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(one, yb.float())))
    scores = binary.scores(one)  # (N, 2) = (1 - p, p): scored like every binary row
    assert scores.shape == (6, 2) and torch.allclose(scores[:, 1], torch.sigmoid(one[:, 0]))
    smoothed = TaskLoss(Task.BINARY, bce1, smoothing=0.2)(one, yb)
    assert smoothed == pytest.approx(float(F.binary_cross_entropy_with_logits(
        one, yb.float() * 0.8 + 0.1)))


def test_balanced_class_weights_follow_scikit_learn_and_enter_the_key():
    """class_weight=balanced weights each class as scikit-learn's class_weight="balanced" on
    the training subset (val loss included); "none" keeps every earlier key."""
    from sklearn.utils.class_weight import compute_class_weight

    torch.manual_seed(0)
    balanced = resolve_recipe("medfm", class_weight="balanced")
    y_train = np.array([[0], [0], [0], [0], [1], [2], [2]])  # 4 / 1 / 2 of 3 classes
    loss = TaskLoss(Task.MULTI_CLASS, balanced, smoothing=0.0, train_labels=y_train)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y_train[:, 0])
    assert loss.class_weights(3) == pytest.approx(expected)
    logits, y = torch.randn(5, 3), torch.tensor([[0], [1], [2], [0], [1]])
    weights = torch.tensor(expected, dtype=torch.float32)
    assert loss(logits, y) == pytest.approx(float(F.cross_entropy(logits, y[:, 0],
                                                                  weight=weights)))
    assert loss(logits, y) != pytest.approx(float(F.cross_entropy(logits, y[:, 0])))
    assert TaskLoss(Task.MULTI_CLASS, balanced, 0.0).class_weights(3) is None  # no labels given
    assert TaskLoss(Task.MULTI_CLASS, RECIPES["medfm"], 0.0, y_train).class_weights(3) is None

    multilabel = np.array([[1, 0], [0, 0], [1, 1], [0, 0]])  # label 0: 2+/2-, label 1: 1+/3-
    bce = TaskLoss(Task.MULTI_LABEL, balanced, 0.0, train_labels=multilabel)
    w = bce.class_weights(2)  # row 0 negatives, row 1 positives
    assert w[:, 0] == pytest.approx([1.0, 1.0]) and w[:, 1] == pytest.approx([4 / 6, 2.0])
    logits2, target = torch.randn(4, 2), torch.tensor(multilabel)
    per = torch.where(target > 0, torch.tensor(w[1], dtype=torch.float32),
                      torch.tensor(w[0], dtype=torch.float32))
    assert bce(logits2, target) == pytest.approx(float(F.binary_cross_entropy_with_logits(
        logits2, target.float(), weight=per)))

    assert "class_weight" not in RECIPES["medfm"].key_params()  # earlier keys stay
    assert balanced.key_params()["class_weight"] == "balanced"
    with pytest.raises(InvalidArgumentError, match="class_weight"):
        resolve_recipe("medfm", class_weight="inverse")


def test_augmentation_is_deterministic_per_seed_and_step():
    x = torch.rand(8, 3, 28, 28)
    a, b = augment(x, seed=3, step=5), augment(x, seed=3, step=5)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, augment(x, seed=4, step=5))
    assert not torch.equal(a, augment(x, seed=3, step=6))
    assert not torch.allclose(a, x)


def test_cifar_stem_keeps_28px_resolution():
    default = create_backbone("resnet18", weights="random", num_classes=2).model.eval()
    cifar = apply_cifar_stem(create_backbone("resnet18", weights="random", num_classes=2).model)
    cifar.eval()
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    x = torch.rand(2, 3, 28, 28)
    assert default.forward_features(x).shape[-2:] == (1, 1)  # 28 / 32, rounded up
    assert cifar.forward_features(x).shape[-2:] == (4, 4)  # 28 / 8: the stem no longer shrinks
    assert cifar(x).shape == (2, 2)
    same = apply_cifar_stem(timm.create_model("resnet18", num_classes=2))
    assert torch.equal(same.conv1.weight, cifar.conv1.weight)  # seeded init
    with pytest.raises(InvalidArgumentError, match="stem=default"):
        apply_cifar_stem(timm.create_model("test_efficientnet"))


# -- the loop ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, recipe, overrides, width", [
    ("breastmnist", "medfm", {"augment": True}, 2),
    ("breastmnist", "seed-paper", {}, 2),  # 1 logit + BCE, scores written as (1 - p, p)
    ("chestmnist", "medfm", {}, 14),
    ("bloodmnist", "medmnist-v2", {"stem": "default"}, 8),
    ("retinamnist", "medfm", {}, 5),
])
def test_jobs_train_and_score_every_task(data_root, tmp_path, dataset, recipe, overrides, width):
    backbone = "test_efficientnet" if dataset == "bloodmnist" else "test_resnet"
    row, scores, y_true = _job(data_root, tmp_path, dataset=dataset, recipe=recipe,
                               backbone=backbone, **overrides)
    assert scores.shape == (N_SPLITS[2], width) and y_true.shape[0] == N_SPLITS[2]
    assert np.all((scores >= 0) & (scores <= 1))
    assert row.key.method == "finetune" and row.device == "cpu" and row.solver == ""
    assert row.n_train == N_SPLITS[0] and 0 <= row.acc <= 1
    curves = row.extra["curves"]
    assert [c["epoch"] for c in curves] == [1.0, 2.0]
    assert all(c["img_s"] > 0 and math.isfinite(c["train_loss"]) for c in curves)
    assert {"val_loss", "val_acc", "val_auc", "lr_head", "seconds"} <= set(curves[0])


def test_a_run_of_few_optimizer_steps_warns(data_root, tmp_path):
    # 48 images, batch 16 shrunk to 12 (medfm: at least 4 steps per epoch), 2 epochs
    with pytest.warns(MedfmWarning, match="4 optimizer step.s. per epoch, 8 in all"):
        _job(data_root, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfmWarning)
        _job(data_root, tmp_path / "long", epochs=26)  # 104 steps: no warning


def test_training_learns_the_synthetic_task(data_root, tmp_path):
    row, _, _ = _job(data_root, tmp_path, epochs=3, lr_backbone=1e-3, lr_head=1e-2)
    assert row.auc > 0.8


def test_resume_after_a_kill_gives_the_uninterrupted_result(data_root, tmp_path):
    overrides = dict(epochs=2, augment=True)
    row, scores, _ = _job(data_root, tmp_path / "whole", **overrides)

    def kill_after_first(round_: int) -> None:
        if round_ == 1:
            raise KeyboardInterrupt  # as if the process died right after the first checkpoint

    with pytest.raises(KeyboardInterrupt):
        _job(data_root, tmp_path / "killed", on_checkpoint=kill_after_first, **overrides)
    torch.manual_seed(123)  # the resumed process starts with other RNG states
    resumed, resumed_scores, _ = _job(data_root, tmp_path / "killed", **overrides)
    assert resumed.extra["resumed"] and not row.extra["resumed"]
    assert np.array_equal(scores, resumed_scores)
    assert (resumed.acc, resumed.auc) == (row.acc, row.auc)
    strip = [{k: v for k, v in c.items() if k not in ("img_s", "seconds")}
             for c in row.extra["curves"]]
    assert strip == [{k: v for k, v in c.items() if k not in ("img_s", "seconds")}
                     for c in resumed.extra["curves"]]


def test_early_stopping_and_best_checkpoint(data_root, tmp_path):
    # a frozen net whose head barely moves never improves val loss after round 1: it stops
    # after `patience` more rounds and tests round 1's weights
    row, _, _ = _job(data_root, tmp_path, epochs=10, lr_head=1e-12, freeze_backbone=True,
                     monitor="loss", select_metric="loss", patience=2)
    assert row.extra["stopped_early"] and len(row.extra["curves"]) == 3
    assert row.extra["best_round"] == 1
    assert (row.key.selection, row.key.select_metric) == ("val", "loss")


def test_freeze_backbone_trains_only_the_head(data_root, tmp_path):
    recipe = resolve_recipe("medfm", **FAST, freeze_backbone=True, lr_head=1e-2)
    row, _, _ = finetune_job(_request(data_root, recipe=recipe), device="cpu", workdir=tmp_path,
                             progress=False)
    before = create_backbone("test_resnet", weights="random", num_classes=2).model.state_dict()
    folder = tmp_path / CHECKPOINTS_DIR / row.key.digest()
    # finetune_job leaves last.pt; its best state is what was tested
    best = torch.load(folder / "last.pt", weights_only=False)["state"]["best_state"]
    body = [k for k in before if not k.startswith("fc.")]
    assert all(torch.equal(before[k], best[k]) for k in body)  # weights and BN statistics
    assert not torch.equal(before["fc.weight"], best["fc.weight"])


def test_from_scratch_recipe_refuses_pretrained_weights(data_root, tmp_path):
    with pytest.raises(MedfmError, match="pretrained=true"):
        _request(data_root, recipe=RECIPES["medmnist-v2"], weights=str(tmp_path / "w.pt"))


# -- batch jobs and the registry ------------------------------------------------------------------

def test_finetune_records_rows_and_skips_done_keys(data_root, tmp_path, monkeypatch):
    kwargs = dict(datasets=["breastmnist"], backbones=["test_resnet"], sizes=[28],
                  fractions=[0.5, 1.0], seeds=(0,), recipe="medfm", overrides=FAST,
                  weights="random", device="cpu", workdir=tmp_path, progress=False)
    report = finetune(data_root=data_root, **kwargs)
    assert len(report.ran) == 2 and report.skipped == ()
    reg = Registry.in_workdir(tmp_path)
    rows = reg.query(method="finetune")
    assert sorted(r.key.fraction for r in rows) == [0.5, 1.0]
    assert {r.n_train for r in rows} == {24, 48}
    y_true, y_score = reg.scores(rows[0].key)
    assert y_score.shape == (N_SPLITS[2], 2) and y_true.shape == (N_SPLITS[2], 1)
    assert '"name":"medfm"' in rows[0].key.params
    for row in rows:  # a finished job keeps its tested weights (and its lock file), not its
        folder = tmp_path / CHECKPOINTS_DIR / row.key.digest()  # resumable state
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, BEST_WEIGHTS_NAME]

    # rerun: every key is done, so no image and no model is loaded
    def nothing(*args, **kw):
        raise AssertionError("a finished fine-tune must not load images or a model")

    monkeypatch.setattr("medfm.finetune.run.load_split", nothing)
    monkeypatch.setattr("medfm.finetune.run.create_backbone", nothing)
    again = finetune(data_root=data_root, **kwargs)
    assert again.ran == () and len(again.skipped) == 2
    assert len(reg) == 2


def test_alias_bare_and_tagged_names_are_one_finetune_run(data_root, tmp_path, monkeypatch):
    """`--backbone resnet18` then `--backbone resnet18.a1_in1k`: the same model, trained once."""
    kwargs = dict(datasets=["breastmnist"], sizes=[28], fractions=[1.0], seeds=(0,),
                  recipe="medfm", overrides={**FAST, "epochs": 1}, weights="random",
                  device="cpu", workdir=tmp_path, data_root=data_root, progress=False)
    first = finetune(backbones=["resnet18"], **kwargs)
    assert len(first.ran) == 1 and first.ran[0].key.backbone == "resnet18.a1_in1k"
    monkeypatch.setattr("medfm.finetune.run.create_backbone", _no_model)
    for spelling in ("resnet18.a1_in1k", "resnet18"):
        again = finetune(backbones=[spelling], **kwargs)
        assert again.ran == () and len(again.skipped) == 1
    assert len(Registry.in_workdir(tmp_path)) == 1
    assert len(Registry.in_workdir(tmp_path).query(backbone="resnet18")) == 1


def _no_model(*args, **kwargs):
    raise AssertionError("a finished run must not load a model")


def test_user_preprocessing_overrides_the_recipe_and_enters_the_key(data_root):
    v2 = RECIPES["medmnist-v2"]  # native size, mean = std = 0.5
    plain = _request(data_root, recipe=v2)
    assert (plain.preprocess.resize_policy, plain.preprocess.input_size) == ("native", 28)
    assert plain.preprocess.mean == (0.5, 0.5, 0.5) and plain.key().normalize == "half"
    asked = _request(data_root, recipe=v2,
                     preprocess=PreprocessRequest(resize_policy="nearest", input_size=64))
    assert (asked.preprocess.resize_policy, asked.preprocess.input_size) == ("nearest", 64)
    assert asked.recipe.normalize == "half"  # not set by the user: the recipe's
    assert (asked.key().resize_policy, asked.key().input_size) == ("nearest", 64)
    assert asked.key().digest() != plain.key().digest()
    assert "resize_policy" not in asked.key().params  # held resolved in the key, once


def test_new_head_on_pretrained_backbone_starts_with_small_logits():
    from medfm.finetune.run import HEAD_INIT_STD, init_head

    model = create_backbone("tf_efficientnet_lite0.in1k", num_classes=2).model.eval()
    init_head(model, seed=3)
    head = model.get_classifier()
    assert abs(float(head.weight.detach().std()) - HEAD_INIT_STD) < 0.002
    assert float(head.bias.detach().abs().max()) == 0.0
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 64, 64))
    assert float(logits.abs().max()) < 2.0


@pytest.mark.slow
def test_balanced_class_weight_reaches_the_training_and_val_losses(data_root, tmp_path):
    """The same run with class_weight=balanced on an imbalanced subset (synthetic RetinaMNIST,
    13/8/9/11/7 images per grade): the first round's train and val losses are the weighted ones,
    and the run has its own key."""
    plain, _, _ = _job(data_root, tmp_path / "plain", dataset="retinamnist", epochs=1)
    weighted, _, _ = _job(data_root, tmp_path / "weighted", dataset="retinamnist", epochs=1,
                          class_weight="balanced")
    assert plain.key.digest() != weighted.key.digest()
    first, first_w = plain.extra["curves"][0], weighted.extra["curves"][0]
    assert first["train_loss"] != pytest.approx(first_w["train_loss"], rel=1e-6)
    assert first["val_loss"] != pytest.approx(first_w["val_loss"], rel=1e-6)


def test_frozen_pretrained_lite0_head_learns_real_breastmnist(real_root, tmp_path):
    recipe = resolve_recipe("medfm", freeze_backbone=True, epochs=4, input_size=64)
    row, scores, y_true = finetune_job(
        _request(real_root, recipe=recipe, backbone="tf_efficientnet_lite0.in1k", weights=None),
        workdir=tmp_path, progress=False)
    assert row.auc > 0.75 and row.acc > 0.74  # above the 73% majority class


def test_sigkill_mid_training_then_rerun_resumes_and_equals_uninterrupted(tmp_path):
    """A real `medfm finetune` process SIGKILLed after a checkpoint; the rerun resumes from it."""
    import signal
    import subprocess
    import sys
    import time

    from medfm.finetune.train import CHECKPOINT_NAME
    from medfm.synthetic import write_synthetic_npz

    root = tmp_path / "data"
    write_synthetic_npz(root, "breastmnist", 28, n=(128, 32, 32))

    def cmd(workdir):
        return [sys.executable, "-m", "medfm", "finetune", "--dataset", "breastmnist", "--size",
                "28", "--backbone", "test_resnet", "--weights", "random", "--device", "cpu",
                "--epochs", "4", "--batch-size", "16", "--resize-policy", "native",
                "--set", "augment=true", "--set", "eval_every=2",  # 16 rounds, 16 checkpoints
                "--data-root", str(root), "--workdir", str(workdir), "--quiet"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list((killed / CHECKPOINTS_DIR).glob(f"*/{CHECKPOINT_NAME}")):
            break  # written atomically: once it is there, it is whole
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (ckpt,) = (killed / CHECKPOINTS_DIR).glob(f"*/{CHECKPOINT_NAME}")
    done_rounds = len(torch.load(ckpt, weights_only=False)["state"]["curves"])
    assert 1 <= done_rounds < 16
    assert len(Registry.in_workdir(killed)) == 0  # nothing recorded for a half-trained run

    for workdir in (killed, tmp_path / "whole"):
        run = subprocess.run(cmd(workdir), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        # 128 images / 16 x 4 epochs = 32 steps: the user is told, on one line
        assert ("medfm finetune: warning: 128 training images in batches of 16 make 8 optimizer "
                "step(s) per epoch, 32 in all" in run.stderr)
    (resumed,) = Registry.in_workdir(killed).query(method="finetune")
    (whole,) = Registry.in_workdir(tmp_path / "whole").query(method="finetune")
    assert resumed.extra["resumed"] and not whole.extra["resumed"]
    assert resumed.key == whole.key and (resumed.acc, resumed.auc) == (whole.acc, whole.auc)
    assert np.array_equal(Registry.in_workdir(killed).scores(resumed.key)[1],
                          Registry.in_workdir(tmp_path / "whole").scores(whole.key)[1])


@pytest.mark.parametrize("batch_size, drop_last", [(128, False), (109, False), (50, True),
                                                    (546, False)])
def test_progress_counts_the_images_the_batches_serve(real_root, batch_size, drop_last):
    """The fine-tune bar's total and resume position are the images actually served: an
    epoch's partial last batch counts what it holds (the bar used to stop short of 100%)."""
    from medfm.finetune.train import Split, _Batches

    with np.load(real_root / "breastmnist.npz") as npz:
        split = Split(npz["train_images"], npz["train_labels"])  # 546 real images
    batches = _Batches(split, batch_size, seed=0, device=torch.device("cpu"),
                       drop_last=drop_last)
    served = 0
    for step in range(3 * batches.per_epoch + 1):
        assert batches.images_before(step) == served
        served += len(batches(step)[0])


def test_compiled_training_gives_the_eager_run_within_tolerance_under_its_key(data_root,
                                                                             tmp_path):
    """--compile trains the same run torch.compile-d (inductor, gcc on this CPU): same key,
    the row says so, and the test scores agree with the eager run's within float32 tolerance."""
    recipe = resolve_recipe("medmnist-v2", epochs=1, batch_size=16, stem="default")
    request = _request(data_root, recipe=recipe)
    eager, eager_scores, _ = finetune_job(request, device="cpu", workdir=tmp_path / "eager",
                                          progress=False)
    compiled, compiled_scores, _ = finetune_job(request, device="cpu",
                                                workdir=tmp_path / "compiled", progress=False,
                                                compile=True)
    assert compiled.key == eager.key
    assert compiled.extra["compiled"] and not eager.extra["compiled"]
    assert compiled.extra["compile_warmup_s"] > 0
    np.testing.assert_allclose(compiled_scores, eager_scores, atol=1e-3)
    assert abs(compiled.auc - eager.auc) < 0.02


@pytest.mark.parametrize("recipe, overrides", [("medfm", {}), ("medmnist-v2", {"epochs": 3}),
                                                ("seed-paper", {"iterations": 30})])
def test_planned_work_is_what_training_does(recipe, overrides, data_root, tmp_path):
    """The cost estimate's count of training images and validation rounds matches a run."""
    from medfm.finetune.train import planned_work

    resolved = resolve_recipe(recipe, **{**FAST, "patience": 0, **overrides})
    row, _, _ = finetune_job(_request(data_root, recipe=resolved), device="cpu",
                             workdir=tmp_path, progress=False)
    images, rounds = planned_work(resolved, row.n_train)
    assert (images, rounds) == (row.extra["train_images"], len(row.extra["curves"]))
