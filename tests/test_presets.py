"""The published presets run the references' code as it runs (docs/presets.md cites each line).

Seed paper: github.com/FupingWu90/FMMIC, SFT/Common_Main.py, Common_Trainer.py, dataset.py.
MedMNIST+: github.com/sdoerrich97/rethinking-model-prototyping-MedMNISTPlus, main.py, train.py,
evaluate.py, utils.py, config.yaml.

Every loop runs for real on the CPU: tiny timm models with seeded random weights on the real
BreastMNIST files (../shared/data/medmnist), in seconds; the MedMNIST+ kNN is checked against an
independent scikit-learn classifier on a real feature store.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import timm
import torch

from medfm.backbones import create_backbone
from medfm.backbones.names import resolve_backbone
from medfm.cli import main
from medfm.data import Task, load_split
from medfm.resolve.recipes import RECIPES
from medfm.finetune import finetune_job
from medfm.resolve.finetune import finetune_requests, resolve_finetune
from medfm.finetune.lora import has_attention
from medfm.resolve.recipes import LATER_FIELDS, resolve_recipe
from medfm.finetune.train import Split, lr_factor, train
from medfm.grid import plan_grid, preset_spec
from medfm.preprocess import DevicePreprocessor, PreprocessConfig, PreprocessRequest, resize
from medfm.resolve.presets import MEDMNIST_PLUS_SEEDS, PRESETS, get_preset
from medfm.probe.methods import get_method
from medfm.report.tables import HEAD_PROBE, annotate
from medfm.resolve.keys import run_key
from medfm.sampling import SubsetSpec, sample
from medfm.store.features import find_stores
from medfm.store.registry import Registry
from medfm.synthetic import synthetic_arrays, write_synthetic_npz

PRESET_FIELDS = ("schedule_scope", "lr_backbone_vit", "drop_last", "whole_epochs", "eval_rounds",
                 "head_init", "frozen_train_mode")  # recipe fields added for the presets


# -- keys of runs that use none of it stay as they were -----------------------------------------

def test_new_settings_leave_every_earlier_key_alone():
    assert all(name in LATER_FIELDS for name in PRESET_FIELDS)
    v2 = RECIPES["medmnist-v2"]
    assert all(getattr(v2, name) == LATER_FIELDS[name] for name in PRESET_FIELDS)
    assert not set(PRESET_FIELDS) & set(v2.key_params())
    store = {"dataset": "breastmnist", "size": 28, "data_digest": "d", "backbone": "b",
             "weights": "pretrained", "resize_policy": "bilinear", "input_size": 224,
             "normalize": "backbone", "feature_kind": "prelogits"}
    knn = get_method("knn")
    default = knn.params("none", knn.resolve_options({}))
    assert default == {"k": 11, "metric": "cosine"}  # no vote: knn keys of before stay
    key = run_key(store=store, method="knn", params=default, selection="none",
                  select_metric="", spec=SubsetSpec(fraction=1.0))
    assert json.loads(key.params) == default  # the default sampler is not keyed either
    first = run_key(store=store, method="knn", params=default, selection="none",
                    select_metric="", spec=SubsetSpec(fraction=1.0, sampler="first-per-class"))
    assert json.loads(first.params)["sampler"] == "first-per-class"
    assert first.digest() != key.digest()


# -- seed paper ------------------------------------------------------------------------------

def test_seed_paper_recipe_is_what_their_job_array_runs():
    r = RECIPES["seed-paper"]
    # Common_Main.py 195-205, 213-226; Common_Trainer.py 43-45, 84-85, 176-179, 186-195
    assert (r.iterations, r.batch_size, r.optimizer, r.lr_head, r.weight_decay) == (
        15_000, 64, "adamw", 1e-3, 1e-2)
    assert (r.lr_backbone, r.lr_backbone_vit) == (1e-6, 1e-7)
    assert (r.schedule, r.gamma, r.decay_every, r.schedule_scope, r.warmup) == (
        "exp", 0.9, 200, "head", 0.0)
    assert (r.drop_last, r.whole_epochs, r.eval_every, r.eval_rounds) == (True, True, 0, 10)
    assert (r.select_metric, r.patience, r.binary_head, r.head_init) == ("acc", 0, "bce1", "timm")
    assert (r.augment, r.label_smoothing, r.grad_clip, r.resize_policy) == (
        False, 0.0, 0.0, "bilinear")
    assert r.frozen_train_mode and get_preset("seed-paper").seeds == (0, 1, 2)


def test_first_per_class_sampler_takes_their_rows(real_root):
    """dataset.py 112-127: the first n rows of each class, whatever the seed; ChestMNIST:
    np.random.seed(seed); np.random.choice(N, n * 14, replace=False)."""
    _, labels = load_split("breastmnist", 28, "train", real_root)
    theirs = []
    for label_id in range(2):  # their loop, on their (N, 1) targets
        theirs += np.where(np.array(labels.squeeze(1)) == label_id)[0].tolist()[:10]
    for seed in (0, 1, 2):
        subset = sample(labels, Task.BINARY, SubsetSpec(shots=10, seed=seed,
                                                        sampler="first-per-class"))
        assert subset.indices.tolist() == sorted(theirs)
    shuffled = sample(labels, Task.BINARY, SubsetSpec(shots=10, seed=0))
    assert shuffled.indices.tolist() != sorted(theirs)  # the default draws other images
    whole = sample(labels, Task.BINARY, SubsetSpec(shots=1001, sampler="first-per-class"))
    assert whole.n == len(labels)  # `sample_num_per_cls < 1001`, else the whole split

    _, chest = synthetic_arrays("chestmnist", 28, 400, seed=3)
    for seed in (0, 2):
        np.random.seed(seed)
        rows = np.random.choice(chest.shape[0], size=5 * 14, replace=False)
        subset = sample(chest, Task.MULTI_LABEL, SubsetSpec(shots=5, seed=seed,
                                                            sampler="first-per-class"))
        assert subset.indices.tolist() == sorted(rows.tolist())


def test_seed_paper_bilinear_upsampling_is_theirs_within_one_grey_level(real_root):
    """dataset.py 148-157: SAM's ResizeLongestSide, i.e. PIL's bilinear resize of the uint8
    image (transforms.py 27-32); medfm resizes the same way in float on the device, so the two
    differ only by PIL's 8-bit rounding."""
    from PIL import Image

    images, _ = load_split("breastmnist", 28, "test", real_root)
    ours = resize(torch.from_numpy(images[:32]).float().div(255).unsqueeze(1), 224, "bilinear")
    theirs = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BILINEAR))
                       for im in images[:32]]).astype(np.float32) / 255
    gap = np.abs(ours.squeeze(1).numpy() - theirs)
    assert gap.max() <= 1.0001 / 255 and gap.mean() < 0.5 / 255


def _seed_paper_run(real_root, workdir, backbone: str, **overrides):
    recipe = resolve_recipe("seed-paper", **overrides)
    request = resolve_finetune(
        dataset="breastmnist", size=28, backbone=backbone, weights="random", recipe=recipe,
        spec=SubsetSpec(shots=10, seed=0, sampler="first-per-class"), data_root=real_root)
    row, _, _ = finetune_job(request, device="cpu", workdir=workdir, progress=False)
    return row


def test_seed_paper_loop_steps_validations_and_learning_rates(real_root, tmp_path):
    """20 images in full batches of 8: 2 steps per epoch (4 images dropped), 51 iterations
    rounded down to 25 whole epochs, validated after epochs 0, 2, ..., 24 (E // 10 = 2); the
    head's lr x0.9 every 4 steps here, the CNN backbone's constant at 1e-6."""
    row = _seed_paper_run(real_root, tmp_path, "test_resnet", iterations=51, batch_size=8,
                          decay_every=4, resize_policy="native")
    curves = row.extra["curves"]
    assert row.n_train == 20 and row.extra["steps"] == 50
    assert [c["step"] for c in curves] == [(e + 1) * 2 for e in range(0, 25, 2)]
    for c in curves:
        assert c["lr_head"] == pytest.approx(1e-3 * 0.9 ** ((c["step"] - 1) // 4))
        assert c["lr_backbone"] == 1e-6
    params = json.loads(row.key.params)
    assert params["sampler"] == "first-per-class" and params["schedule_scope"] == "head"


def test_seed_paper_transformers_train_their_backbone_at_1e_7(real_root, tmp_path):
    assert has_attention(timm.create_model("test_vit"))
    assert not has_attention(timm.create_model("test_resnet"))
    row = _seed_paper_run(real_root, tmp_path, "test_vit", iterations=4, batch_size=8,
                          resize_policy="bilinear", input_size=32)
    assert {c["lr_backbone"] for c in row.extra["curves"]} == {1e-7}


def _bn_buffers(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}


@pytest.mark.parametrize("recipe, moves", [("seed-paper", True), ("medmnist-plus", True),
                                           ("medfm", False)])
def test_frozen_backbone_batchnorm_moves_as_in_their_linear_probing(real_root, recipe, moves):
    """Common_Trainer.py 130 / MedMNIST+ train.py 113: model.train() for linear probing too, so
    the frozen backbone's BatchNorm statistics move (medfm's own frozen probe keeps them)."""
    images, labels = load_split("breastmnist", 28, "train", real_root)
    val = Split(*load_split("breastmnist", 28, "val", real_root))
    bb = create_backbone("test_resnet", weights="random", num_classes=2)
    weights = {k: v.clone() for k, v in bb.model.state_dict().items() if k.endswith("weight")
               and not k.startswith(("fc", "head"))}
    before = _bn_buffers(bb.model)
    cfg = PreprocessRequest("native").resolve(bb.data_config, source_size=28)
    r = resolve_recipe(recipe, freeze_backbone=True, iterations=0, epochs=1, batch_size=16,
                       patience=0, binary_head="ce2")
    out = train(bb.model, recipe=r, task=Task.BINARY, train=Split(images, labels, np.arange(32)),
                val=val, preprocess=cfg, device=torch.device("cpu"), seed=0, progress=False)
    after_state = out.model.state_dict()
    assert all(torch.equal(after_state[k], v) for k, v in weights.items())  # frozen
    moved = any(not torch.equal(after_state[k], v) for k, v in before.items())
    assert moved is moves


def test_seed_paper_per_backbone_input_and_batch_and_grid_agree(real_root, tmp_path):
    """Common_Main.py 99-100 (DINOv2 at 518, everything else at --img_resize 224, SAM and
    Inception included) and 223-226 (DINOv2-base fine-tuned in batches of 32); the requests of
    `medfm finetune --preset` are the grid's, key for key."""
    backbones = ["dinov2_vitb14", "dinov2_vits14", "sam_vitb16", "inception_v3", "resnet18"]
    common = dict(backbones=backbones, sizes=[28], datasets=["breastmnist"],
                  data_root=real_root, preset="seed-paper")
    tuned, _ = finetune_requests(**common)
    frozen, _ = finetune_requests(**common, overrides={"freeze_backbone": True})
    sides = {r.backbone.arch: r.preprocess.input_size for r in tuned}
    assert sides == {"vit_base_patch14_dinov2": 518, "vit_small_patch14_dinov2": 518,
                     "samvit_base_patch16": 224, "inception_v3": 224, "resnet18": 224}
    batches = {(r.backbone.arch, r.recipe.freeze_backbone): r.recipe.batch_size
               for r in tuned + frozen}
    assert batches[("vit_base_patch14_dinov2", False)] == 32
    assert {b for (arch, fz), b in batches.items()
            if (arch, fz) != ("vit_base_patch14_dinov2", False)} == {64}
    assert {r.spec.seed for r in tuned} == {0, 1, 2}
    assert {r.spec.sampler for r in tuned} == {"first-per-class"}
    spec = preset_spec("seed-paper", datasets=["breastmnist"], sizes=[28], backbones=backbones,
                       data_root=real_root)
    grid = {j.request.key().digest() for j in plan_grid(spec, workdir=tmp_path).todo("finetune")}
    assert grid == {r.key().digest() for r in tuned + frozen}


def test_preset_refuses_what_would_not_be_the_preset(real_root, capsys):
    base = ["finetune", "--preset", "seed-paper", "--backbone", "resnet18", "--size", "28",
            "--dataset", "breastmnist", "--data-root", str(real_root)]
    for extra, words in ((["--recipe", "medfm"], "recipe 'seed-paper'"),
                         (["--sampler", "shuffled"], "sampler 'first-per-class'")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err


# -- MedMNIST+ -------------------------------------------------------------------------------

def test_medmnist_plus_recipe_is_their_config():
    r = RECIPES["medmnist-plus"]
    # config.yaml 10-12; train.py 86-87 (timm AdamW: weight decay 0.01), 91-96, 100-103, 184-198
    assert (r.epochs, r.batch_size, r.lr_head, r.lr_backbone, r.weight_decay) == (
        100, 64, 1e-4, 1e-4, 1e-2)
    assert (r.schedule, r.warmup, r.select_metric, r.monitor, r.patience) == (
        "cosine-epoch", 0.0, "loss", "loss", 5)
    assert (r.binary_head, r.head_init, r.frozen_train_mode) == ("ce2", "timm", True)
    assert (r.resize_policy, r.input_size, r.augment, r.label_smoothing) == (
        "pad-norm", 224, False, 0.0)
    preset = get_preset("medmnist-plus")
    assert preset.seeds == MEDMNIST_PLUS_SEEDS == (9930641, 115149041, 252139603)
    assert preset.probe_options("knn") == {"knn_metric": "euclidean", "knn_vote": "majority"}
    assert preset.dtype == "float32"


def test_medmnist_plus_extracts_in_float32_as_theirs_even_on_cuda(real_root, tmp_path, capsys):
    """main.py 48-61: fp32 everywhere; medfm would extract under bf16 autocast on CUDA."""
    spec = dataclasses.replace(preset_spec("medmnist-plus", datasets=["breastmnist"], sizes=[28],
                                           backbones=["resnet18"], data_root=real_root),
                               device="cuda")
    (job,) = plan_grid(spec, workdir=tmp_path).todo("extract")
    assert job.request.precision == "float32"
    preset = get_preset("medmnist-plus")
    assert preset.store_mismatch({**job.request.identity(), "precision": "bfloat16"},
                                 job.request.backbone) is not None
    assert main(["extract", "--preset", "medmnist-plus", "--precision", "bfloat16",
                 "--backbone", "resnet18", "--dataset", "breastmnist", "--size", "28",
                 "--data-root", str(real_root), "--workdir", str(tmp_path)]) == 2
    assert "extracts in float32" in capsys.readouterr().err


@pytest.mark.parametrize("rows, steps", [(34, 3), (33, 2)])
def test_medmnist_plus_keeps_partial_batches_but_a_lone_image(real_root, rows, steps):
    """main.py 97: their loader keeps the last partial batch; medfm keeps it too, unless it is
    one image (BatchNorm cannot train on it)."""
    images, labels = load_split("breastmnist", 28, "train", real_root)
    val = Split(*load_split("breastmnist", 28, "val", real_root))
    bb = create_backbone("test_resnet", weights="random", num_classes=2)
    cfg = PreprocessRequest("native").resolve(bb.data_config, source_size=28)
    recipe = resolve_recipe("medmnist-plus", epochs=1, batch_size=16)
    out = train(bb.model, recipe=recipe, task=Task.BINARY,
                train=Split(images, labels, np.arange(rows)), val=val, preprocess=cfg,
                device=torch.device("cpu"), seed=0, progress=False)
    assert out.steps == steps


def test_cosine_epoch_is_timm_cosine_stepped_per_epoch():
    """train.py 87 and 138: CosineLRScheduler(t_initial=epochs), step(epoch=e) after epoch e."""
    from timm.scheduler import CosineLRScheduler

    epochs, per_epoch = 100, 3
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-4)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs, cycle_limit=1, t_in_epochs=True)
    recipe = RECIPES["medmnist-plus"]
    for epoch in range(epochs):
        for j in range(per_epoch):
            ours = 1e-4 * lr_factor(epoch * per_epoch + j, epochs * per_epoch, recipe, per_epoch)
            assert ours == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        scheduler.step(epoch=epoch)


def test_pad_norm_canvas_is_the_normalized_zero(real_root):
    """main.py 81-89: ToTensor, Normalize, then Pad(fill=0): the canvas is 0 after normalizing
    (the mean colour), not black as with `pad`."""
    images, _ = load_split("breastmnist", 28, "test", real_root)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = {policy: DevicePreprocessor(PreprocessConfig(224, policy, mean, std),
                                      channels_last=False)(torch.from_numpy(images[:4])).numpy()
           for policy in ("pad-norm", "pad")}
    x = images[:4, None].astype(np.float32) / 255.0  # theirs, in numpy: (B, 1, 28, 28)
    theirs = (np.repeat(x, 3, axis=1) - np.reshape(mean, (1, 3, 1, 1)).astype(np.float32)) / \
        np.reshape(std, (1, 3, 1, 1)).astype(np.float32)
    theirs = np.pad(theirs, ((0, 0), (0, 0), (98, 98), (98, 98)))
    np.testing.assert_allclose(out["pad-norm"], theirs, atol=1e-6)
    assert out["pad-norm"][:, :, 0, 0].tolist() == [[0.0] * 3] * 4
    black = (0.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(out["pad"][0, :, 0, 0], black, atol=1e-6)


@pytest.fixture(scope="module")
def plus_store(real_root, tmp_path_factory):
    """A work folder with one store of real BreastMNIST extracted as medmnist-plus extracts
    (normalized, zero-padded into 224 px, float32) by a tiny seeded ViT, probed by kNN."""
    workdir = tmp_path_factory.mktemp("plus")
    assert main(["extract", "--preset", "medmnist-plus", "--backbone", "test_vit", "--weights",
                 "random", "--dataset", "breastmnist", "--size", "28", "--data-root",
                 str(real_root), "--workdir", str(workdir), "--quiet"]) == 0
    assert main(["probe", "--preset", "medmnist-plus", "--method", "knn", "--workdir",
                 str(workdir), "--quiet"]) == 0
    return workdir


def test_medmnist_plus_knn_equals_sklearn_on_a_real_store(plus_store):
    """evaluate.py 88, 119 and utils.py 135-159: Euclidean on the embeddings as they are, k = 11,
    majority vote; ACC equals scikit-learn's KNeighborsClassifier(n_neighbors=11) exactly."""
    from sklearn.neighbors import KNeighborsClassifier

    (store,) = find_stores(plus_store, resize_policy="pad-norm")
    assert find_stores(plus_store, resize_policy="pad") == []  # another policy, not a prefix
    assert (store.request["resize_policy"], store.request["input_size"],
            store.request["dtype"]) == ("pad-norm", 224, "float32")
    train_x, test_x = store.features("train"), store.features("test")
    train_y, test_y = store.labels("train")[:, 0], store.labels("test")[:, 0]
    expected = KNeighborsClassifier(n_neighbors=11).fit(train_x, train_y).score(test_x, test_y)
    rows = Registry.in_workdir(plus_store).to_dataframe(method="knn")
    assert sorted(rows["seed"]) == sorted(MEDMNIST_PLUS_SEEDS)  # their seeds by default
    assert set(rows["acc"]) == {expected}
    assert json.loads(rows["params"].iloc[0]) == {"k": 11, "metric": "euclidean",
                                                  "vote": "majority"}


def test_medmnist_plus_probe_keys_are_the_grid_s(plus_store, real_root):
    spec = dataclasses.replace(preset_spec("medmnist-plus", datasets=["breastmnist"], sizes=[28],
                                           backbones=["test_vit"], data_root=real_root),
                               weights="random")
    plan = plan_grid(spec, workdir=plus_store)
    assert plan.done["extract"] == 1 and plan.done["probe"] == 3  # kNN x their 3 seeds
    assert {j.probe.method for j in plan.todo("probe")} == {"logreg"}


def test_preset_probe_refuses_other_options_and_other_stores(plus_store, tmp_path, capsys):
    assert main(["probe", "--preset", "medmnist-plus", "--method", "knn", "--knn-metric",
                 "cosine", "--workdir", str(plus_store), "--quiet"]) == 2
    assert "knn_metric='euclidean'" in capsys.readouterr().err
    write_synthetic_npz(tmp_path, "breastmnist", size=28, n=(24, 8, 8))
    assert main(["extract", "--backbone", "test_vit", "--weights", "random", "--input-size",
                 "32", "--dataset", "breastmnist", "--size", "28", "--data-root", str(tmp_path),
                 "--workdir", str(tmp_path / "w"), "--quiet"]) == 0
    (other,) = find_stores(tmp_path / "w")
    assert main(["probe", "--preset", "medmnist-plus", "--method", "knn", "--store",
                 str(other.path), "--workdir", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "medfm extract --preset medmnist-plus" in err


def test_medmnist_plus_head_probe_from_the_command_line_is_labelled(real_root, tmp_path):
    """`medfm finetune --preset medmnist-plus --freeze-backbone`: their linear probing (timm's
    head, train-mode model, per-epoch cosine, pad-norm 224), shown apart from logreg."""
    assert main(["finetune", "--preset", "medmnist-plus", "--freeze-backbone", "--backbone",
                 "test_vit", "--weights", "random", "--dataset", "breastmnist", "--size", "28",
                 "--data-root", str(real_root), "--shots", "5", "--seeds", "9930641",
                 "--epochs", "2", "--workdir", str(tmp_path), "--quiet"]) == 0
    frame = Registry.in_workdir(tmp_path).to_dataframe()
    params = json.loads(frame["params"].iloc[0])
    assert (params["freeze_backbone"], params["frozen_train_mode"], params["head_init"],
            params["schedule"]) == (True, True, "timm", "cosine-epoch")
    assert (frame["resize_policy"].iloc[0], frame["input_size"].iloc[0]) == ("pad-norm", 224)
    shown = annotate(frame)
    assert (shown["method"].iloc[0], shown["paradigm"].iloc[0]) == HEAD_PROBE[:2]


def test_every_preset_grid_lists_its_reference_s_methods():
    assert PRESETS["seed-paper"].methods == ("logreg", "head-probe", "finetune")
    assert PRESETS["medmnist-plus"].methods == ("logreg", "knn", "head-probe", "finetune")
    assert "eva02_base_patch16_clip_224" in PRESETS["medmnist-plus"].backbones
    assert resolve_backbone("vit_base_patch16_clip_224", None).id == (
        "vit_base_patch16_clip_224.laion2b_ft_in12k_in1k")
    assert math.isclose(lr_factor(400, 15_000, RECIPES["seed-paper"]), 0.81)
