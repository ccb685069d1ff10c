"""LoRA as a third paradigm: adapters injected with peft, only adapters + head trained, keyed as
its own method, checkpointed and resumed like a full fine-tune.

Real tiny timm models (`test_resnet` with BatchNorm, `test_efficientnet`, `test_vit`) with seeded
random weights on the synthetic 28 px files of conftest, on the CPU, for 1-2 epochs.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from medfm.cli import main
from medfm.errors import InvalidArgumentError
from medfm.finetune import finetune, finetune_job
from medfm.resolve.finetune import resolve_finetune
from medfm.resolve.recipes import resolve_recipe
from medfm.finetune.lora import apply_lora, default_targets, resolve_targets
from medfm.finetune.run import BEST_WEIGHTS_NAME, CHECKPOINTS_DIR, _build_model
from medfm.finetune.train import (
    CHECKPOINT_NAME,
    Split,
    TaskLoss,
    load_model_state,
    predict,
    train,
)
from medfm.data import Task, load_split
from medfm.preprocess import DevicePreprocessor
from medfm.sampling import SubsetSpec
from medfm.store.registry import Registry

# seconds per job; lr high enough that every trained tensor visibly moves in 6 steps
FAST = dict(epochs=2, batch_size=16, resize_policy="native", augment=False, lora_rank=4,
            lora_lr=1e-2, lr_head=1e-2)


def _request(root, *, backbone="test_resnet", seed=0, **overrides):
    return resolve_finetune(dataset="breastmnist", size=28, backbone=backbone, weights="random",
                            spec=SubsetSpec(fraction=1.0, seed=seed),
                            recipe=resolve_recipe("medfm", **{**FAST, **overrides}),
                            data_root=root)


def _job(root, workdir, *, on_checkpoint=None, **overrides):
    return finetune_job(_request(root, **overrides), device="cpu", workdir=workdir,
                        progress=False, on_checkpoint=on_checkpoint)


# -- which layers ----------------------------------------------------------------------------

def test_default_targets_per_family():
    vit = default_targets(timm.create_model("test_vit", num_classes=2))
    assert vit and all(n.endswith(("attn.qkv", "attn.proj")) for n in vit)
    assert len(vit) == 2 * len(timm.create_model("test_vit").blocks)  # qkv + proj per block
    resnet = timm.create_model("test_resnet", num_classes=2)
    convs = [n for n, m in resnet.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert default_targets(resnet) == convs and "fc" not in default_targets(resnet)
    lite0 = timm.create_model("tf_efficientnet_lite0", num_classes=2)
    chosen = dict(lite0.named_modules())
    picked = [chosen[n] for n in default_targets(lite0)]
    # pointwise/dense convs only: no depthwise (groups > 1), no dynamic-padding Conv2dSame stem
    assert "blocks.1.0.conv_pw" in default_targets(lite0)
    assert "conv_stem" not in default_targets(lite0) and "conv_head" in default_targets(lite0)
    assert all(m.groups == 1 and type(m) is torch.nn.Conv2d for m in picked)


class _FusedAttention(torch.nn.Module):
    """A tower as OpenCLIP builds one: torch's MultiheadAttention, then an MLP and a head."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 2)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.mlp(self.attn(x, x, x, need_weights=False)[0]).mean(1))


def test_fused_attention_is_adapted_as_a_whole():
    """Its out_proj Linear is never called (the module uses its weights): adapting it would be a
    silent no-op, so the attention module itself is the target, and naming out_proj is refused."""
    model = _FusedAttention()
    assert default_targets(model) == ["attn"]
    with pytest.raises(InvalidArgumentError, match="cannot adapt attn.out_proj"):
        resolve_targets(model, "out_proj")
    x = torch.rand(2, 5, 16)
    before = model(x)
    adapted = apply_lora(model, resolve_recipe("medfm", lora_rank=4), seed=0)
    assert torch.allclose(before, adapted(x))
    adapted(x).sum().backward()
    assert float(adapted.attn.lora_B["default"].weight.grad.abs().sum()) > 0  # in-projection
    assert not adapted.mlp.weight.requires_grad


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_vit"])
def test_adapters_start_at_the_pretrained_function(backbone):
    """B = 0: the adapted model computes what the original did, before any step."""
    model = timm.create_model(backbone, num_classes=2).eval()
    size = 160 if backbone == "test_vit" else 32
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
        adapted = apply_lora(model, resolve_recipe("medfm", lora_rank=4), seed=0)
        assert torch.equal(before, adapted(x))
    assert any("lora_A" in n for n, _ in adapted.named_parameters())


@pytest.mark.parametrize("targets, words", [
    ("bn1", "cannot adapt bn1"),
    ("no_such_layer", "names no module"),
    ("fc", "classifier head"),
])
def test_targets_peft_cannot_adapt_are_refused(targets, words):
    model = timm.create_model("test_resnet", num_classes=2)
    with pytest.raises(InvalidArgumentError, match=words):
        resolve_targets(model, targets)


def test_a_backbone_without_adaptable_layers_is_refused():
    """Only depthwise convs and norms: nothing peft can adapt exactly."""

    class Depthwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 3, groups=8)
            self.head = torch.nn.Linear(8, 2)

        def get_classifier(self):
            return self.head

    with pytest.raises(InvalidArgumentError, match="no layer to adapt in Depthwise"):
        resolve_targets(Depthwise(), "auto")


# -- training ----------------------------------------------------------------------------------

def test_only_adapters_and_head_change(synthetic_root):
    """Every backbone tensor, BatchNorm statistics included, is bit-identical after training;
    every adapter B and the head moved. (test_efficientnet: a random test_resnet zero-inits its
    blocks' last BatchNorm, which leaves their adapters without a gradient.)"""
    request = _request(synthetic_root, backbone="test_efficientnet")
    model, _, _ = _build_model(request)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = load_split("breastmnist", 28, "train", synthetic_root)
    val = Split(*load_split("breastmnist", 28, "val", synthetic_root))
    outcome = train(model, recipe=request.recipe, task=Task.BINARY, train=Split(images, labels),
                    val=val, preprocess=request.preprocess, device=torch.device("cpu"), seed=0,
                    progress=False)
    after = outcome.model.state_dict()
    assert set(after) == set(before)
    frozen = [k for k in before if "lora_" not in k and not k.startswith("classifier.")]
    assert any("running_mean" in k for k in frozen) and len(frozen) > 60
    changed = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert changed == []
    trained = [k for k in before if "lora_B" in k] + ["classifier.weight", "classifier.bias"]
    assert [k for k in trained if torch.equal(before[k], after[k])] == []
    assert all(float(after[k].abs().max()) > 0 for k in before if "lora_B" in k)


def test_parameter_counts_are_recorded(synthetic_root, tmp_path):
    row, _, _ = _job(synthetic_root, tmp_path / "lora", epochs=1)
    base = timm.create_model("test_resnet", num_classes=2)
    rank, adapters = 4, 0
    for name in default_targets(base):  # A: rank x (in x kh x kw), B: out x rank
        m = base.get_submodule(name)
        k = m.kernel_size[0] * m.kernel_size[1] if isinstance(m, torch.nn.Conv2d) else 1
        width_in = m.in_channels if isinstance(m, torch.nn.Conv2d) else m.in_features
        width_out = m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
        adapters += rank * width_in * k + width_out * rank
    head = sum(p.numel() for p in base.get_classifier().parameters())
    total = sum(p.numel() for p in base.parameters())
    assert row.extra["trainable_params"] == adapters + head
    assert row.extra["total_params"] == total + adapters
    assert row.extra["lora_modules"] == len(default_targets(base))
    full, _, _ = _job(synthetic_root, tmp_path / "full", epochs=1, lora_rank=0)
    assert full.extra["trainable_params"] == full.extra["total_params"] == total
    assert full.extra["lora_modules"] == 0


def test_the_key_separates_lora_from_fine_tuning_and_ranks(synthetic_root):
    full = _request(synthetic_root, lora_rank=0).key()
    rank4, rank8 = (_request(synthetic_root, lora_rank=r).key() for r in (4, 8))
    alpha = _request(synthetic_root, lora_alpha=32).key()
    targets = _request(synthetic_root, lora_targets="conv1").key()
    assert (full.method, rank4.method) == ("finetune", "lora")
    digests = {k.digest() for k in (full, rank4, rank8, alpha, targets)}
    assert len(digests) == 5
    assert '"lora_rank":4' in rank4.params and '"lora_targets":"conv1"' in targets.params
    # a run without adapters keys no LoRA field: keys recorded before LoRA existed still match
    assert "lora" not in full.params
    # the targets' order and spacing are one spelling
    same = _request(synthetic_root, lora_targets=" conv2 ,conv1").key()
    assert same.digest() == _request(synthetic_root, lora_targets="conv1,conv2").key().digest()


def test_a_killed_lora_run_resumes_to_the_uninterrupted_result(synthetic_root, tmp_path):
    overrides = dict(augment=True, lora_dropout=0.2)  # RNG-driven: dropout and augmentation
    row, scores, _ = _job(synthetic_root, tmp_path / "whole", **overrides)

    def kill_after_first(round_: int) -> None:
        if round_ == 1:
            raise KeyboardInterrupt  # as if the process died right after the first checkpoint

    with pytest.raises(KeyboardInterrupt):
        _job(synthetic_root, tmp_path / "killed", on_checkpoint=kill_after_first, **overrides)
    (ckpt,) = (tmp_path / "killed" / CHECKPOINTS_DIR).glob(f"*/{CHECKPOINT_NAME}")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert all("lora_" in k or k.startswith("fc.") for k in saved["model"])  # adapters + head
    torch.manual_seed(123)  # the resumed process starts with other RNG states
    resumed, resumed_scores, _ = _job(synthetic_root, tmp_path / "killed", **overrides)
    assert resumed.extra["resumed"] and not row.extra["resumed"]
    assert np.array_equal(scores, resumed_scores)
    strip = [{k: v for k, v in c.items() if k not in ("img_s", "seconds")}
             for c in row.extra["curves"]]
    assert strip == [{k: v for k, v in c.items() if k not in ("img_s", "seconds")}
                     for c in resumed.extra["curves"]]
    assert "lr_adapters" in row.extra["curves"][0]


def test_recorded_lora_run_keeps_its_adapters_in_best_pt(synthetic_root, tmp_path):
    """finetune() records the run as method "lora"; best.pt holds the tested adapters and head
    as plain tensors, and rebuilt from them the model scores the test split as recorded."""
    report = finetune(datasets=["breastmnist"], backbones=["test_resnet"], sizes=[28],
                      recipe="medfm",
                      overrides={**{k: v for k, v in FAST.items() if k != "lora_rank"},
                                 "epochs": 1},
                      lora=True, weights="random", device="cpu", workdir=tmp_path,
                      data_root=synthetic_root, progress=False)
    (row,) = report.ran
    assert row.key.method == "lora" and '"lora_rank":8' in row.key.params  # lora=True: rank 8
    reg = Registry.in_workdir(tmp_path)
    assert [r.key.method for r in reg.query(method="lora")] == ["lora"]
    best = torch.load(tmp_path / CHECKPOINTS_DIR / row.key.digest() / BEST_WEIGHTS_NAME,
                      map_location="cpu", weights_only=True)
    assert any("lora_B" in k for k in best) and "fc.weight" in best
    request = resolve_finetune(dataset="breastmnist", size=28, backbone="test_resnet",
                               weights="random", spec=SubsetSpec(fraction=1.0, seed=0),
                               recipe=resolve_recipe("medfm", **{**FAST, "lora_rank": 8,
                                                                 "epochs": 1}),
                               data_root=synthetic_root)
    assert request.key() == row.key
    model, _, _ = _build_model(request)
    load_model_state(model, best, request.recipe)
    test = Split(*load_split("breastmnist", 28, "test", synthetic_root))
    scores, _ = predict(model, test, prep=DevicePreprocessor(request.preprocess,
                                                             torch.device("cpu")),
                        loss=TaskLoss(Task.BINARY, request.recipe, 0.0), batch_size=32)
    assert np.allclose(scores, reg.scores(row.key)[1], atol=1e-6)


# -- the command line --------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--lora-targets", "bn1"], "LoRA cannot adapt bn1"),
    (["--lora", "--backbone", "tf_efficientnet_lite0", "--lora-targets", "conv_stem"],
     "LoRA cannot adapt conv_stem of EfficientNet (Conv2dSame)"),
    (["--lora", "--recipe", "medmnist-v2"], "trains from scratch"),
    (["--lora", "--freeze-backbone"], "drop freeze_backbone"),
    (["--lora", "--lora-rank", "0"], "lora_rank >= 1"),
])
def test_lora_user_errors_are_one_line_exit_2(synthetic_root, tmp_path, capsys, extra, needle):
    argv = ["finetune", "--dataset", "breastmnist", "--size", "28", "--backbone", "test_resnet",
            "--weights", "random", "--device", "cpu", "--epochs", "1", "--resize-policy",
            "native", "--data-root", str(synthetic_root), "--workdir", str(tmp_path), "--quiet",
            *extra]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if "warning:" not in line]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err
    assert len(Registry.in_workdir(tmp_path)) == 0
