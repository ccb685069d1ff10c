"""Backbone formats as a registry (medfm.backbones.formats): every built-in format implements the
protocol, names dispatch on their prefix, and a format defined outside the package (here, in
this test) works end to end through `extract`, `probe` and the CLI after one registration call.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from medfm.backbones import create_backbone, resolve_backbone
from medfm.backbones.formats import (FORMATS, BackboneFormat, Built, format_for, format_named,
                                     register_format)
from medfm.backbones.names import canonical_backbone_id
from medfm.backbones.ref import RANDOM, BackboneRef
from medfm.cli import main
from medfm.data import load_split
from medfm.errors import InvalidArgumentError, UnknownBackboneError
from medfm.extract import extract
from medfm.preprocess import DevicePreprocessor, PreprocessRequest
from medfm.probe import probe
from medfm.store.features import find_stores

TOY_SIDE = 32  # the toy format's input side


class ToyFormat:
    """`toy:<timm architecture>`: a timm test model at 32 px with a seeded init, named by a
    prefix of its own (a fifth format, as a newcomer would write it)."""

    name = "toy"
    prefixes = ("toy:",)

    def parse(self, name: str) -> str:
        arch = name.strip()[len("toy:"):]
        if not arch.startswith("test_"):
            raise UnknownBackboneError(f"toy backbones are timm test models, not {arch!r}")
        return arch

    def canonical_id(self, name: str) -> str:
        return f"toy:{self.parse(name)}"

    def resolve(self, name: str, weights: str | None) -> BackboneRef:
        config = {"input_size": (3, TOY_SIDE, TOY_SIDE), "mean": (0.5,) * 3, "std": (0.25,) * 3,
                  "interpolation": "bilinear"}
        return BackboneRef(id=self.canonical_id(name), weights=RANDOM, name=name.strip(),
                           format=self.name, source_config=config, arch=self.parse(name))

    def build(self, ref: BackboneRef, *, num_classes: int, in_chans: int, init_seed: int,
              **timm_kwargs) -> Built:
        from medfm.backbones.checkpoints import seeded_create

        model = seeded_create(ref.arch, pretrained=False, init_seed=init_seed,
                              num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
        return Built(model, "toy", ref.data_config())


@pytest.fixture
def toy():
    fmt = register_format(ToyFormat())  # the one call a new format needs
    yield fmt
    FORMATS.pop(fmt.name)


@pytest.mark.parametrize("name", ["registry", "timm", "open_clip", "hf"])
def test_every_built_in_format_implements_the_protocol(name):
    fmt = FORMATS[name]
    assert isinstance(fmt, BackboneFormat) and fmt.name == name
    assert all(format_for(f"{p}x") is fmt for p in fmt.prefixes)


@pytest.mark.parametrize(("name", "fmt"), [
    ("resnet18", "registry"), ("hf-hub:org/m", "timm"), ("local-dir:/m", "timm"),
    ("open_clip:hf-hub:org/m", "open_clip"), ("open_clip:ViT-B-32/openai", "open_clip"),
    ("hf:org/m", "hf"), (" hf:/m", "hf"), ("org/m", "registry")])
def test_names_dispatch_on_their_prefix(name, fmt):
    assert format_for(name).name == fmt


def test_a_registered_format_runs_extract_and_probe(toy, real_root):
    name = "toy:test_resnet"
    assert format_for(name) is toy
    result = extract(dataset="breastmnist", backbone=name, size=28, device="cpu",
                     data_root=real_root, progress=False)
    assert result.status == "built" and "__toy:test_resnet__" in result.path.name
    bb = create_backbone(name)
    assert bb.ref == resolve_backbone(name) and bb.weights == "toy" and bb.ref.format == "toy"
    images, _ = load_split("breastmnist", 28, "test", real_root)
    config = PreprocessRequest().resolve(bb.data_config, source_size=28)
    assert config.input_size == TOY_SIDE and config.mean == (0.5,) * 3
    with torch.no_grad():
        x = DevicePreprocessor(config)(torch.from_numpy(np.asarray(images[:8])))
        expected = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
    with h5py.File(result.path) as fh:
        assert fh["test/features"].shape == (len(images), bb.feature_dim)
        stored = fh["test/features"][:8]
        assert fh.attrs["weights_digest"] == bb.weights_digest
    np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-2, atol=1e-3)  # float16 store
    again = extract(dataset="breastmnist", backbone=f" {name}", size=28, device="cpu",
                    data_root=real_root, progress=False)
    assert again.status == "exists" and again.path == result.path  # found, nothing recomputed
    assert canonical_backbone_id(name) == bb.ref.id
    assert [s.path for s in find_stores(backbone=f"{name} ")] == [result.path]  # a filter value
    report = probe(dataset="breastmnist", backbone=name, fractions=[1.0], seeds=[0],
                   device="cpu", progress=False)
    (row,) = report.computed
    assert row.key.backbone == "toy:test_resnet" and 0.5 < row.auc <= 1.0


def test_a_registered_format_through_the_cli(toy, real_root, capsys):
    argv = ["extract", "--dataset", "breastmnist", "--size", "28", "--backbone",
            "toy:test_vit", "--device", "cpu", "--data-root", str(real_root), "--quiet"]
    assert main(argv) == 0
    assert main(argv) == 0  # the second run finds the store
    assert main([*argv[:6], "toy:resnet18", *argv[7:]]) == 2  # the format's own error
    assert "toy backbones are timm test models" in capsys.readouterr().err


def test_without_its_registration_a_prefix_is_not_a_format(real_root):
    with pytest.raises(UnknownBackboneError):
        resolve_backbone("toy:test_resnet")
    with pytest.raises(InvalidArgumentError, match="register_format"):
        format_named("toy")


def test_formats_cannot_claim_each_others_names(toy):
    class Clash(ToyFormat):
        name = "clash"
        prefixes = ("hf",)  # would take hf: and hf-hub: names

    with pytest.raises(ValueError, match="claims names"):
        register_format(Clash())
    with pytest.raises(TypeError):
        register_format(object())
    assert "clash" not in FORMATS
