"""OpenCLIP image towers and Transformers vision encoders behind timm's feature API, so extraction
and fine-tuning use them unchanged:

    model = build_encoder(ref, num_classes=2)                  # ref from resolve_backbone("hf:...")
    f = model.forward_head(model.forward_features(x), pre_logits=True)   # (B, model.num_features)
    model.get_classifier(); model.reset_classifier(5)          # the new head fine-tuning trains

Each loads through its format's own code (open_clip.create_model, transformers.AutoModel) from
the files `medfm.backbones.hub` found; only the image encoder is kept (a CLIP text tower is
dropped). The head is a Linear on the pooled features (Identity for num_classes=0), built under
the caller's seed.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from medfm.backbones.hub import parse_source_name
from medfm.backbones.names import RANDOM, BackboneRef
from medfm.errors import WeightsError

HEAD_NAME = "head"  # the classifier's attribute (pretrained_cfg["classifier"], as in timm)


class PooledEncoder(nn.Module):
    """An image encoder with timm's uniform API: forward_features -> forward_head(pre_logits)."""

    def __init__(self, encoder: nn.Module, *, num_features: int, num_classes: int,
                 features: str):
        super().__init__()
        self.encoder = encoder
        self.features = features  # which pooled vector (medfm.backbones.hub.FORMATS)
        self.num_features = num_features  # width of forward_head(..., pre_logits=True)
        self.pretrained_cfg = {"classifier": HEAD_NAME}
        self.reset_classifier(num_classes)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """forward_features' output -> (B, num_features)."""
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


class OpenClipImageTower(PooledEncoder):
    """OpenCLIP's `model.visual`: features "embed" (its output, the projected image embedding)
    or "pooled" (the same tower with its projection removed)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, D) pooled already


class TransformersEncoder(PooledEncoder):
    """A Transformers vision model: features "cls" (last_hidden_state[:, 0]), "mean" (mean of
    the patch tokens, after the CLS and register tokens) or "pooler" (pooler_output)."""

    def __init__(self, encoder: nn.Module, *, prefix_tokens: int, **kwargs):
        super().__init__(encoder, **kwargs)
        self.prefix_tokens = prefix_tokens  # CLS + register tokens before the patch tokens
        params = inspect.signature(encoder.forward).parameters
        # ViT-style models need this to run at another input size (DINOv2 always interpolates)
        self.interpolate = "interpolate_pos_encoding" in params

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.encoder(pixel_values=x, **kwargs)
        if self.features == "pooler":
            return out.pooler_output  # (B, D)
        return out.last_hidden_state  # (B, N, D)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.features == "cls":
            return x[:, 0]
        if self.features == "mean":
            return x[:, self.prefix_tokens:].mean(dim=1)
        return x


def _width(encoder: nn.Module, side: int, forward) -> int:
    """Feature width, read off one forward pass on a blank (1, 3, side, side) image."""
    with torch.no_grad():
        return int(forward(torch.zeros(1, 3, side, side)).shape[-1])


def _open_clip_tower(ref: BackboneRef, source, features: str) -> nn.Module:
    import open_clip

    pretrained = ref.weights != RANDOM
    try:
        if source.builtin:
            model, tag = source.builtin
            clip = open_clip.create_model(model, pretrained=tag if pretrained else None)
        else:
            clip = open_clip.create_model(f"local-dir:{ref.folder}", load_weights=pretrained)
    except Exception as err:  # noqa: BLE001 - open_clip raises RuntimeError/ValueError/KeyError
        raise WeightsError(f"OpenCLIP cannot build {ref.name!r} from its files "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:200]}).") from err
    visual = clip.visual
    if features == "pooled":
        if isinstance(visual, open_clip.transformer.VisionTransformer):
            visual.proj = None  # the tower then returns its pooled features
        elif isinstance(getattr(visual, "head", None), nn.Module) and hasattr(visual, "trunk"):
            visual.head = nn.Identity()  # timm trunk + projection head (e.g. BiomedCLIP)
        else:
            raise WeightsError(f"{ref.name!r}: this OpenCLIP tower ({type(visual).__name__}) has "
                               "no separate projection; use ?features=embed.")
    return visual


def _transformers_model(ref: BackboneRef, features: str) -> tuple[nn.Module, object]:
    """(vision encoder, its config). Weights that leave a used tensor uninitialized are an error
    (Transformers itself only warns); an unused pooler (features other than "pooler") may be."""
    import transformers

    try:
        if ref.weights == RANDOM:
            config = transformers.AutoConfig.from_pretrained(ref.folder)
            model = transformers.AutoModel.from_config(config)
        else:
            model, info = transformers.AutoModel.from_pretrained(ref.folder,
                                                                 output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - unknown model_type, bad weights: many types
        raise WeightsError(f"Transformers cannot load {ref.name!r} from {ref.folder} "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:200]}).") from err
    if ref.weights != RANDOM:
        unused = "pooler" if features != "pooler" else None
        missing = [k for k in info.get("missing_keys", ())
                   if not (unused and (k.startswith(f"{unused}.") or f".{unused}." in k))]
        bad = sorted(missing) + sorted(str(k) for k in info.get("mismatched_keys", ()))
        if bad:
            raise WeightsError(f"the weights in {ref.folder} do not fit {ref.name!r}'s config "
                               f"(missing or mismatched: {', '.join(bad[:5])}); save model and "
                               "config together with save_pretrained.")
    vision = getattr(model, "vision_model", None)  # CLIP/SigLIP: keep the image encoder
    encoder = vision if isinstance(vision, nn.Module) else model
    config = getattr(model.config, "vision_config", None) or model.config
    return encoder, config


def build_encoder(ref: BackboneRef, *, num_classes: int) -> PooledEncoder:
    """The encoder of an OpenCLIP or Transformers checkpoint ref, with a new head."""
    source = parse_source_name(ref.name)
    side = ref.data_config()["input_size"][-1]
    if ref.format == "open_clip":
        visual = _open_clip_tower(ref, source, source.features)
        return OpenClipImageTower(visual, features=source.features, num_classes=num_classes,
                                  num_features=_width(visual, side, visual))
    encoder, config = _transformers_model(ref, source.features)
    has_cls = not str(getattr(config, "model_type", "")).startswith("siglip")
    if source.features == "cls" and not has_cls:
        raise WeightsError(f"{ref.name!r} ({config.model_type}) has no CLS token; use "
                           "?features=pooler or ?features=mean.")
    prefix = int(has_cls) + int(getattr(config, "num_register_tokens", 0) or 0)
    model = TransformersEncoder(encoder, prefix_tokens=prefix, features=source.features,
                                num_classes=0, num_features=1)
    model.eval()
    model.num_features = _width(model, side,
                                lambda x: model.forward_head(model.forward_features(x),
                                                             pre_logits=True))
    model.reset_classifier(num_classes)
    return model
