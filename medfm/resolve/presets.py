"""The published protocols by name, in one place for every stage, so that one condition run on its
own (`medfm extract|probe|finetune --preset NAME`) is exactly the run the preset's grid
(`medfm grid --preset NAME`) makes.

    from medfm.resolve.presets import get_preset
    preset = get_preset("medmnist-plus")
    preset.preprocess(backbone_ref)                  # PreprocessRequest for that backbone
    preset.recipe_overrides(backbone_ref, frozen=False)   # its per-backbone recipe settings
    preset.probe_options("knn")                      # {"knn_metric": "euclidean", ...}

A preset holds what its grid runs (backbones, sizes, subsets, seeds, methods), how subsets are
drawn (`sampler`), how images are prepared and stored, the fine-tune recipe and the probe
methods' options, and the per-backbone rules of its reference code (the seed paper feeds DINOv2
518 px and everything else 224 px, and fine-tunes DINOv2-base in batches of 32). Every value, and
the line of the reference code it comes from, is listed in docs/presets.md; where medfm differs on
purpose, that file says why.

Methods of a preset's grid: registered probe methods (logreg: medfm's cached logistic probe, an
addition the references do not have; knn), `finetune` (end to end) and `head-probe`: the head
trained through the frozen backbone by the fine-tune loop, the references' "linear probing"
(recorded as a fine-tune with freeze_backbone, labelled so in reports).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medfm.errors import InvalidArgumentError
from medfm.preprocess import PreprocessRequest
from medfm.resolve.methods import get_method_spec

if TYPE_CHECKING:
    from medfm.backbones.names import BackboneRef

FINETUNE = "finetune"  # a grid method: the whole backbone trains
HEAD_PROBE = "head-probe"  # a grid method: the head trains through the frozen backbone
SEED_PAPER_SEEDS = (0, 1, 2)  # FMMIC SFT/Common_Main.py line 181
MEDMNIST_PLUS_SEEDS = (9930641, 115149041, 252139603)  # MedMNISTPlus config.yaml line 22
MEDMNIST_SIZES = (28, 64, 128, 224)
SEED_PAPER_INPUT = 224  # their --img_resize (Common_Main.py line 175) ...
SEED_PAPER_DINOV2_INPUT = 518  # ... except DINOv2 (line 99-100: 'dino2' in the backbone's name)
SEED_PAPER_DINOV2_BASE_BATCH = 32  # DINOv2-base fine-tuned in batches of 32 (lines 223-226)
DINOV2_BASE_ARCH = "vit_base_patch14_dinov2"

# The seed paper's zoo (Common_Main.py lines 30-52) as medfm aliases (medfm.backbones.names).
SEED_PAPER_BACKBONES = (
    "vgg16", "resnet18", "densenet121", "efficientnet_b4", "inception_v3", "inception_resnet_v2",
    "vit_b16", "clip_vitb16_laion2b", "clip_vitb16_openai_ft", "clip_vitb16_openai",
    "eva02_vitb14", "dino_vitb16", "dino_vits16", "dinov2_vits14", "dinov2_vitb14", "sam_vitb16",
    "sam_in1k_vitb16",
)
# MedMNIST+'s zoo as their code names it (feature_extraction.py lines 101-103; timm resolves a
# bare architecture to its default tag). AlexNet comes from torchvision, not timm: left out.
MEDMNIST_PLUS_BACKBONES = (
    "vgg16", "resnet18", "densenet121", "efficientnet_b4", "vit_base_patch16_224",
    "vit_base_patch16_clip_224", "eva02_base_patch16_clip_224", "vit_base_patch16_224.dino",
    "samvit_base_patch16",
)


def _seed_paper_input(backbone: BackboneRef) -> int:
    """224 px for every backbone but DINOv2's 518 (their `img_resize`)."""
    return SEED_PAPER_DINOV2_INPUT if "dinov2" in backbone.arch else SEED_PAPER_INPUT


def _seed_paper_overrides(backbone: BackboneRef, frozen: bool) -> dict[str, Any]:
    """Batch 32 when DINOv2-base trains end to end (their `backbone_update == 'ft'`)."""
    if backbone.arch == DINOV2_BASE_ARCH and not frozen:
        return {"batch_size": SEED_PAPER_DINOV2_BASE_BATCH}
    return {}


@dataclass(frozen=True)
class Preset:
    """One published protocol: its grid, its data and preprocessing rules, its recipe."""

    name: str  # what --preset takes
    reference: str  # paper and code it reproduces
    recipe: str  # fine-tune recipe (medfm.resolve.recipes), for finetune and head-probe
    backbones: tuple[str, ...]  # the grid's backbones
    sizes: tuple[int, ...]  # MedMNIST source sizes
    fractions: tuple[float, ...]  # training fractions of the grid
    shots: tuple[int, ...]  # images per class of the grid
    seeds: tuple[int, ...]  # the reference's seeds
    sampler: str  # medfm.sampling sampler mode
    methods: tuple[str, ...]  # probe methods, FINETUNE and HEAD_PROBE
    probe_settings: tuple[tuple[str, Any], ...]  # probe methods' options (sorted pairs)
    resize_policy: str  # preprocessing of every stage
    input_size: int | None  # None: `input_rule`, else the backbone's
    dtype: str  # feature store dtype
    precision: str | None = None  # arithmetic of extraction (medfm.runtime.PRECISIONS); None:
    #                               the device's default (bfloat16 on CUDA)
    input_rule: Callable[[BackboneRef], int] | None = None  # per-backbone input side
    backbone_rule: Callable[[BackboneRef, bool], dict] | None = None  # (backbone, frozen) ->
    #                                                   recipe settings of that backbone

    def preprocess(self, backbone: BackboneRef) -> PreprocessRequest:
        """How this preset prepares images for `backbone` (extract and fine-tune alike)."""
        size = self.input_rule(backbone) if self.input_rule is not None else self.input_size
        return PreprocessRequest(self.resize_policy, size, None)

    def recipe_overrides(self, backbone: BackboneRef, *, frozen: bool) -> dict[str, Any]:
        """Recipe settings this preset gives `backbone` (under the user's own overrides)."""
        return dict(self.backbone_rule(backbone, frozen)) if self.backbone_rule else {}

    @property
    def probe_methods(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m not in (FINETUNE, HEAD_PROBE))

    def probe_options(self, method: str) -> dict[str, Any]:
        """The options this preset gives probe `method` (medfm.resolve.methods)."""
        own = {o.name for o in get_method_spec(method).options}
        return {k: v for k, v in self.probe_settings if k in own}

    def check_probe_method(self, method: str) -> None:
        if method not in self.probe_methods:
            raise InvalidArgumentError(
                f"preset {self.name} probes with {', '.join(self.probe_methods)}, not "
                f"{method!r}; its head-through-frozen-backbone probe is `medfm finetune "
                f"--preset {self.name} --freeze-backbone`.")

    def store_mismatch(self, identity: dict, backbone: BackboneRef) -> str | None:
        """Why a store of this `identity` (what a store records) is not one this preset
        extracts for `backbone`, or None when it is."""
        want = self.preprocess(backbone)
        precision = identity.get("precision", "float32")  # named only where not float32
        found = (identity["resize_policy"], identity["normalize"], identity["dtype"])
        if found != (want.resize_policy, "backbone", self.dtype) or (
                want.input_size is not None and identity["input_size"] != want.input_size) or (
                self.precision is not None and precision != self.precision):
            return (f"extracted as {identity['resize_policy']}{identity['input_size']} "
                    f"{identity['normalize']} {identity['dtype']} in {precision}, where preset "
                    f"{self.name} extracts {want.resize_policy}{want.input_size or ''} backbone "
                    f"{self.dtype}{f' in {self.precision}' if self.precision else ''}")
        return None

    def extract_precision(self, asked: str | None) -> str | None:
        """The precision to extract in when the user asked for `asked` ("auto"/None: not
        asked): this preset's, where it fixes one; a different one is an error."""
        if self.precision is None or asked in (None, "auto"):
            return self.precision or asked
        if asked != self.precision:
            raise InvalidArgumentError(
                f"preset {self.name} extracts in {self.precision}, as its reference does; drop "
                f"--precision {asked}, or --preset.")
        return asked


PRESETS: dict[str, Preset] = {
    "seed-paper": Preset(
        name="seed-paper",
        reference="Wu & Papiez 2025, github.com/FupingWu90/FMMIC (SFT/)",
        recipe="seed-paper", backbones=SEED_PAPER_BACKBONES, sizes=MEDMNIST_SIZES,
        fractions=(0.01, 0.1, 1.0), shots=(), seeds=SEED_PAPER_SEEDS, sampler="first-per-class",
        methods=("logreg", HEAD_PROBE, FINETUNE), probe_settings=(),
        resize_policy="bilinear", input_size=None, dtype="float16",
        input_rule=_seed_paper_input, backbone_rule=_seed_paper_overrides,
    ),
    "medmnist-plus": Preset(
        name="medmnist-plus",
        reference="Doerrich et al. 2025, github.com/sdoerrich97/"
                  "rethinking-model-prototyping-MedMNISTPlus",
        recipe="medmnist-plus", backbones=MEDMNIST_PLUS_BACKBONES, sizes=MEDMNIST_SIZES,
        fractions=(1.0,), shots=(), seeds=MEDMNIST_PLUS_SEEDS, sampler="shuffled",
        methods=("logreg", "knn", HEAD_PROBE, FINETUNE),
        probe_settings=(("knn_metric", "euclidean"), ("knn_vote", "majority")),
        resize_policy="pad-norm", input_size=224, dtype="float32", precision="float32",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is an error naming the closest."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InvalidArgumentError(
            f"unknown preset {name!r}{hint}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]
