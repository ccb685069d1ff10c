"""Zero-shot classification (issue 30) end to end with a tiny OpenCLIP model and a tiny
Transformers CLIP model, each saved by its library into a local hub cache and read offline; the
recorded scores are checked against each library's own encode_text / get_text_features,
encode_image / get_image_features and logit scale, on a binary (real BreastMNIST), a multi-class
and a multi-label (synthetic) dataset."""

from __future__ import annotations

import json

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medfm.backbones import resolve_backbone
from medfm.cli import main
from medfm.data import Task, get_dataset, load_split
from medfm.extract import extract
from medfm.preprocess import DevicePreprocessor, PreprocessRequest
from medfm.probe import probe
from medfm.report.tables import annotate, summarize
from medfm.report.zeroshot import spread_zero_shot
from medfm.store.features import find_stores
from medfm.store.registry import Registry
from tests.test_hub import to_hub_cache

SIDE = 32
CLIP_REPO, HF_REPO = "medfm-test/tiny-clip-text", "medfm-test/tiny-hf-clip"
SIGLIP_REPO = "medfm-test/tiny-siglip"
CLIP_CONFIG = {  # a tiny OpenCLIP model with OpenCLIP's own tokenizer vocabulary
    "embed_dim": 16,
    "vision_cfg": {"image_size": SIDE, "layers": 1, "width": 32, "patch_size": 8,
                   "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 2,
                 "layers": 1},
}
FLAGS = {"breastmnist": Task.BINARY, "bloodmnist": Task.MULTI_CLASS,
         "chestmnist": Task.MULTI_LABEL}
TEMPLATE = "a medical image of {}."


def _save_open_clip(folder):
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf

    torch.manual_seed(1)
    model = open_clip.CLIP(**CLIP_CONFIG)
    model.visual.image_mean, model.visual.image_std = (0.5,) * 3, (0.25,) * 3
    folder.mkdir(parents=True)
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=CLIP_CONFIG)
    return folder


def _save_hf(folder, kind: str):
    """A tiny Transformers CLIP or SigLIP with a word-level tokenizer over the label names'
    words (no vocabulary file can be downloaded here)."""
    import re

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for flag in FLAGS for name in get_dataset(flag).label_names
                    for w in re.findall(r"\w+|[^\w\s]+", f"{TEMPLATE} no {name}")})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    torch.manual_seed(2)
    text = {"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32,
            "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": SIDE, "patch_size": 8}
    stats = {"image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    if kind == "hf":
        config = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                         projection_dim=16)
        transformers.CLIPModel(config).save_pretrained(folder)
        transformers.CLIPImageProcessor(
            size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
            **stats).save_pretrained(folder)
    else:  # SigLIP has no projections: both towers end at one width
        config = transformers.SiglipConfig(text_config={**text, "hidden_size": 32},
                                           vision_config=vision)
        transformers.SiglipModel(config).save_pretrained(folder)
        transformers.SiglipImageProcessor(size={"height": SIDE, "width": SIDE},
                                          **stats).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero-shot-checkpoints")
    folders = {"open_clip": _save_open_clip(root / "clip"), "hf": _save_hf(root / "hf", "hf"),
               "siglip": _save_hf(root / "siglip", "siglip")}
    for kind, repo in (("open_clip", CLIP_REPO), ("hf", HF_REPO), ("siglip", SIGLIP_REPO)):
        to_hub_cache(root / "hub", folders[kind], repo)
    return {**folders, "hub": root / "hub"}


@pytest.fixture(autouse=True)
def offline_hub(checkpoints, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(checkpoints["hub"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(checkpoints["hub"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


NAMES = {"open_clip": f"open_clip:hf-hub:{CLIP_REPO}", "hf": f"hf:{HF_REPO}?features=pooler",
         "siglip": f"hf:{SIGLIP_REPO}?features=pooler"}


def _root(flag, real_root, synthetic_root):
    return real_root if flag == "breastmnist" else synthetic_root


def _prompts(flag: str, templates=(TEMPLATE,)) -> list[list[str]]:
    """The prompt sets the README documents, written out here independently."""
    info = get_dataset(flag)
    if info.task is Task.MULTI_LABEL:
        return [[t.format(n) for t in templates] for name in info.label_names
                for n in (name, f"no {name}")]
    return [[t.format(name) for t in templates] for name in info.label_names]


def _direct_scores(kind: str, folder, flag: str, root, templates=(TEMPLATE,)) -> np.ndarray:
    """The test split's scores computed with the library's own model, tokenizer and calls."""
    images, _ = load_split(flag, 28, "test", root)
    config = PreprocessRequest().resolve(resolve_backbone(NAMES[kind]).data_config(),
                                         source_size=28)
    x = DevicePreprocessor(config)(torch.from_numpy(images))
    texts = [t for prompts in _prompts(flag, templates) for t in prompts]
    with torch.no_grad():
        if kind == "open_clip":
            import open_clip

            model = open_clip.create_model(f"local-dir:{folder}").eval()
            tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
            text, image = model.encode_text(tokenizer(texts)), model.encode_image(x)
        else:
            from transformers import AutoModel, AutoTokenizer

            model = AutoModel.from_pretrained(folder).eval()
            padding = ({"padding": True} if kind == "hf" else  # SigLIP: as it was trained
                       {"padding": "max_length", "max_length": 32})
            tokens = AutoTokenizer.from_pretrained(folder)(texts, return_tensors="pt",
                                                           **padding)
            text, image = model.get_text_features(**tokens), model.get_image_features(
                pixel_values=x)
            text = text if isinstance(text, torch.Tensor) else text.pooler_output
            image = image if isinstance(image, torch.Tensor) else image.pooler_output
        scale = model.logit_scale.exp().item()
        bias = model.logit_bias.item() if kind == "siglip" else 0.0
    text = torch.nn.functional.normalize(text.double(), dim=-1)
    text = text.reshape(-1, len(templates), text.shape[-1]).mean(dim=1)  # prompt ensembling
    text = torch.nn.functional.normalize(text, dim=-1)
    logits = scale * torch.nn.functional.normalize(image.double(), dim=-1) @ text.T + bias
    if FLAGS[flag] is Task.MULTI_LABEL:
        return torch.sigmoid(logits[:, 0::2] - logits[:, 1::2]).numpy()
    return torch.softmax(logits, dim=1).numpy()


def _zero_shot(kind, flag, root, workdir, **kwargs):
    extract(dataset=flag, backbone=NAMES[kind], size=28, device="cpu", data_root=root,
            workdir=workdir, progress=False)
    return probe(dataset=flag, method="zero-shot", workdir=workdir, progress=False, **kwargs)


@pytest.mark.parametrize("flag", list(FLAGS))
@pytest.mark.parametrize("kind", ["open_clip", "hf", "siglip"])
def test_zero_shot_scores_are_the_librarys_own(checkpoints, real_root, synthetic_root,
                                               tmp_path, kind, flag):
    root = _root(flag, real_root, synthetic_root)
    (row,) = _zero_shot(kind, flag, root, tmp_path / "w").computed
    assert row.key.method == "zero-shot" and row.key.fraction is None and row.key.shots is None
    assert row.n_train == 0 and row.key.selection == "none"
    assert json.loads(row.key.params) == {"templates": [TEMPLATE]}
    assert row.extra["prompts"] == _prompts(flag) and row.extra["text_cached"] is False
    y_true, scores = Registry.in_workdir(tmp_path / "w").scores(row.key)
    expected = _direct_scores(kind, checkpoints[kind], flag, root)
    assert scores.shape == expected.shape == (len(y_true), get_dataset(flag).n_classes)
    # the store keeps float16 image features: agreement to that precision
    np.testing.assert_allclose(scores, expected, atol=3e-3)
    assert row.auc == pytest.approx(_auc(y_true, expected, FLAGS[flag]), abs=0.02)


def _auc(y_true, scores, task):
    from medfm.metrics import auc

    return auc(y_true, scores, task)


def test_text_embeddings_are_cached_next_to_the_store(checkpoints, real_root, tmp_path,
                                                      monkeypatch, capsys):
    work = tmp_path / "w"
    (first,) = _zero_shot("open_clip", "breastmnist", real_root, work).computed
    (store,) = find_stores(work)
    cached = list(store.path.with_suffix(".zero-shot").glob("*.npz"))
    assert len(cached) == 1

    def no_model(store):
        raise AssertionError("the cached text embeddings must be used")

    monkeypatch.setattr("medfm.probe.zeroshot.text.load_text_tower", no_model)
    again = probe(dataset="breastmnist", method="zero-shot", workdir=work, progress=False)
    assert not again.computed and len(again.skipped) == 1  # keyed and resumable
    (forced,) = probe(dataset="breastmnist", method="zero-shot", workdir=work, force=True,
                      progress=False).computed
    assert forced.extra["text_cached"] is True and forced.key == first.key
    assert forced.auc == first.auc and forced.acc == first.acc


def test_user_templates_and_class_names_are_keyed_by_their_text(checkpoints, real_root,
                                                                tmp_path):
    work = tmp_path / "w"
    templates = tmp_path / "templates.txt"
    templates.write_text("an ultrasound image of {}.\n\na breast ultrasound showing {}.\n")
    (row,) = _zero_shot("open_clip", "breastmnist", real_root, work,
                        zs_templates=str(templates)).computed
    assert json.loads(row.key.params)["templates"] == ["an ultrasound image of {}.",
                                                       "a breast ultrasound showing {}."]
    _, scores = Registry.in_workdir(work).scores(row.key)
    expected = _direct_scores("open_clip", checkpoints["open_clip"], "breastmnist", real_root,
                              templates=("an ultrasound image of {}.",
                                         "a breast ultrasound showing {}."))
    np.testing.assert_allclose(scores, expected, atol=3e-3)
    names = tmp_path / "names.txt"
    names.write_text("malignant tumour\nbenign or normal tissue\n")
    (named,) = probe(dataset="breastmnist", method="zero-shot", zs_class_names=str(names),
                     workdir=work, progress=False).computed
    assert named.extra["prompts"] == [["a medical image of malignant tumour."],
                                      ["a medical image of benign or normal tissue."]]
    assert named.key.digest() != row.key.digest()


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_stores_without_image_embeddings_say_what_to_extract(checkpoints, synthetic_root,
                                                             tmp_path, capsys):
    work = tmp_path / "w"
    extract(dataset="breastmnist", backbone=f"{NAMES['open_clip']}?features=pooled", size=28,
            device="cpu", data_root=synthetic_root, workdir=work, progress=False)
    err = _one_line_error(["probe", "--method", "zero-shot", "--workdir", str(work),
                           "--quiet"], capsys)
    assert "?features=embed" in err and "medfm extract" in err
    from tests.test_probe import write_store

    plain = tmp_path / "plain"
    write_store(plain, "breastmnist")  # a timm-registry backbone: no text tower
    err = _one_line_error(["probe", "--method", "zero-shot", "--workdir", str(plain),
                           "--quiet"], capsys)
    assert "CLIP-family" in err


def test_reports_show_zero_shot_as_a_flat_line_at_every_fraction(checkpoints, real_root,
                                                                 tmp_path):
    work = tmp_path / "w"
    (zero,) = _zero_shot("open_clip", "breastmnist", real_root, work).computed
    probe(dataset="breastmnist", fractions=[0.1, 1.0], seeds=[0], method="knn", workdir=work,
          progress=False)
    summary = summarize(annotate(Registry.in_workdir(work).to_dataframe()))
    assert set(summary["regime"]) == {"zero-shot", "10%", "100%"}
    flat = spread_zero_shot(summary)
    rows = flat[flat["method"] == "zero-shot"]
    assert sorted(rows["regime"]) == ["10%", "100%"]
    assert (rows["auc_mean"] == zero.auc).all()
    assert main(["report", "--workdir", str(work)]) == 0
    guideline = (work / "report" / "guideline.md").read_text()
    assert guideline.count("zero-shot") >= 2  # compared in both fraction cells


def test_a_grid_runs_zero_shot_once_per_store_beside_the_probes(checkpoints, synthetic_root,
                                                                tmp_path):
    from medfm.grid.run import run_grid
    from medfm.grid.spec import load_spec

    spec_path = tmp_path / "grid.yaml"
    spec_path.write_text(
        f"datasets: [bloodmnist]\nsizes: [28]\nbackbones: ['{NAMES['open_clip']}']\n"
        "fractions: [0.5, 1.0]\nseeds: [0, 1]\nmethods: [simpleshot, zero-shot]\n"
        f"device: cpu\ndata_root: {synthetic_root}\n")
    work = tmp_path / "w"
    result = run_grid(load_spec(spec_path), workdir=work, progress=False, max_workers=1)
    rows = Registry.in_workdir(work).query()
    assert sorted(r.key.method for r in rows) == ["simpleshot"] * 4 + ["zero-shot"]
    (zero,) = [r for r in rows if r.key.method == "zero-shot"]
    assert zero.key.fraction is None and zero.key.shots is None and zero.n_train == 0
    again = run_grid(load_spec(spec_path), workdir=work, progress=False, max_workers=1)
    assert not again.plan.jobs and result.plan.total["probe"] == 5


def test_zero_shot_over_a_mixed_workdir_runs_on_the_clip_stores_only(checkpoints,
                                                                     synthetic_root, tmp_path,
                                                                     capsys):
    from tests.test_probe import write_store

    work = tmp_path / "w"
    write_store(work, "breastmnist")  # a store of a timm backbone: no text tower
    (row,) = _zero_shot("open_clip", "breastmnist", synthetic_root, work).computed
    assert row.key.backbone.startswith("open_clip:")
    plain = [s for s in find_stores(work) if not s.request["backbone"].startswith("open_clip")]
    err = _one_line_error(["probe", "--method", "zero-shot", "--store", str(plain[0].path),
                           "--workdir", str(work)], capsys)
    assert "CLIP-family" in err
    names = tmp_path / "names.txt"
    names.write_text("only one\n")
    err = _one_line_error(["probe", "--method", "zero-shot", "--zs-class-names", str(names),
                           "--workdir", str(work), "--quiet", "--force"], capsys)
    assert "2 classes" in err
    err = _one_line_error(["probe", "--method", "zero-shot", "--fractions", "0.1",
                           "--workdir", str(work)], capsys)
    assert "trains on nothing" in err
