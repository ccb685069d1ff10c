"""Image encoders that are not timm models, behind timm's feature API, so extraction and
fine-tuning use them unchanged (OpenCLIP image towers, Transformers vision encoders; the formats
in medfm.backbones.formats build them):

    model = TransformersEncoder(vit, prefix_tokens=1, features="cls", num_features=768,
                                num_classes=2)
    f = model.forward_head(model.forward_features(x), pre_logits=True)   # (B, model.num_features)
    model.get_classifier(); model.reset_classifier(5)          # the new head fine-tuning trains

Only the image encoder is kept (a CLIP text tower is dropped). The head is a Linear on the
pooled features (Identity for num_classes=0), built under the caller's seed.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

HEAD_NAME = "head"  # the classifier's attribute (pretrained_cfg["classifier"], as in timm)


class PooledEncoder(nn.Module):
    """An image encoder with timm's uniform API: forward_features -> forward_head(pre_logits)."""

    def __init__(self, encoder: nn.Module, *, num_features: int, num_classes: int,
                 features: str):
        super().__init__()
        self.encoder = encoder
        self.features = features  # which pooled vector (the format's `features` choices)
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


def feature_width(side: int, forward) -> int:
    """Feature width, read off one forward pass on a blank (1, 3, side, side) image."""
    with torch.no_grad():
        return int(forward(torch.zeros(1, 3, side, side)).shape[-1])
