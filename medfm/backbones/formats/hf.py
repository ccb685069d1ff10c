"""The Transformers format: a vision encoder saved with `save_pretrained` (config.json,
preprocessor_config.json, model.safetensors), on the Hub or in a local folder, built by
transformers.AutoModel.

    hf:facebook/dinov2-small                  id "hf:facebook--dinov2-small?features=cls"
    hf:/models/rad-dino?features=mean         the mean of the patch tokens
    ...?features=pooler                       the model's own pooled output (SigLIP: no CLS)

The data config is the image processor's input side, mean, std and resampling. A CLIP/SigLIP
checkpoint keeps its vision model only. Needs the `hf` extra.
"""

from __future__ import annotations

from pathlib import Path

from medfm.backbones.formats.base import Built
from medfm.backbones.hub import (IMAGE_SIZE, CheckpointFormat, SourceName, data_config,
                                 find_file, read_json_config, square_side, where_files)
from medfm.backbones.ref import RANDOM, BackboneRef
from medfm.errors import InvalidArgumentError, WeightsError

PREPROCESSOR_FILE = "preprocessor_config.json"  # Transformers' image processor config
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # Transformers' `resample` codes
SHOWN_KEYS = 5  # missing or mismatched keys quoted in a WeightsError
WHY_CHARS = 200  # of Transformers' own error message quoted in a WeightsError


def hf_data_config(processor: dict, name: str, where: Path) -> dict:
    """The image processor's input side (its crop when it center-crops, else its resize), mean,
    std and resampling: what AutoImageProcessor.from_pretrained reads."""
    if "image_mean" not in processor or "image_std" not in processor:
        raise WeightsError(f"backbone {name!r}: {where} has no image_mean/image_std, so it is "
                           "not an image processor config.")
    crop = processor.get("do_center_crop") and processor.get("crop_size")
    side = square_side(crop or processor.get("size", IMAGE_SIZE), name, where)
    mean, std = processor["image_mean"], processor["image_std"]
    mean, std = (mean * 3, std * 3) if len(mean) == 1 else (mean, std)
    return data_config(side, mean, std, PIL_RESAMPLE.get(processor.get("resample"), "bicubic"))


def _load(ref: BackboneRef, features: str):
    """(vision encoder, its config). Weights that leave a used tensor uninitialized are an error
    (Transformers itself only warns); an unused pooler (features other than "pooler") may be."""
    # Transformers (an optional extra, seconds to import) loads only to build a model
    import transformers
    from torch import nn

    try:
        if ref.weights == RANDOM:
            config = transformers.AutoConfig.from_pretrained(ref.folder)
            model = transformers.AutoModel.from_config(config)
        else:
            model, info = transformers.AutoModel.from_pretrained(ref.folder,
                                                                 output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - unknown model_type, bad weights: many types
        raise WeightsError(f"Transformers cannot load {ref.name!r} from {ref.folder} "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:WHY_CHARS]})."
                           ) from err
    if ref.weights != RANDOM:
        unused = "pooler" if features != "pooler" else None
        missing = [k for k in info.get("missing_keys", ())
                   if not (unused and (k.startswith(f"{unused}.") or f".{unused}." in k))]
        bad = sorted(missing) + sorted(str(k) for k in info.get("mismatched_keys", ()))
        if bad:
            raise WeightsError(f"the weights in {ref.folder} do not fit {ref.name!r}'s config "
                               f"(missing or mismatched: {', '.join(bad[:SHOWN_KEYS])}); save "
                               "model and config together with save_pretrained.")
    vision = getattr(model, "vision_model", None)  # CLIP/SigLIP: keep the image encoder
    encoder = vision if isinstance(vision, nn.Module) else model
    config = getattr(model.config, "vision_config", None) or model.config
    return encoder, config


class TransformersFormat(CheckpointFormat):
    """hf:org/name and hf:/path."""

    def read_data_config(self, source: SourceName, config: dict, config_path: Path,
                         name: str) -> tuple[dict, list[Path]]:
        if "model_type" not in config:
            raise WeightsError(f"backbone {name!r}: {config_path} has no model_type, so it is not "
                               "a Transformers config (a timm checkpoint loads with hf-hub: or "
                               "local-dir:).")
        processor = find_file(source, PREPROCESSOR_FILE)
        if processor is None:
            raise WeightsError(f"backbone {name!r}: {where_files(source)} has no "
                               f"{PREPROCESSOR_FILE} (the image processor's size, mean and std); "
                               "save it with AutoImageProcessor.save_pretrained.")
        return hf_data_config(read_json_config(processor, name), name, processor), [processor]

    def build(self, ref: BackboneRef, *, num_classes: int, in_chans: int, init_seed: int,
              **timm_kwargs) -> Built:
        # torch (seconds to import) loads only to build a model
        import torch

        # the encoders module imports torch: loaded only to build a model
        from medfm.backbones.encoders import TransformersEncoder, feature_width

        if in_chans != 3 or timm_kwargs:
            raise InvalidArgumentError(f"{ref.name!r} takes 3-channel input and no timm options.")
        source = self.parse(ref.name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            encoder, config = _load(ref, source.features)
            has_cls = not str(getattr(config, "model_type", "")).startswith("siglip")
            if source.features == "cls" and not has_cls:
                raise WeightsError(f"{ref.name!r} ({config.model_type}) has no CLS token; use "
                                   "?features=pooler or ?features=mean.")
            prefix = int(has_cls) + int(getattr(config, "num_register_tokens", 0) or 0)
            model = TransformersEncoder(encoder, prefix_tokens=prefix, features=source.features,
                                        num_classes=0, num_features=1)
            model.eval()
            model.num_features = feature_width(
                ref.data_config()["input_size"][-1],
                lambda x: model.forward_head(model.forward_features(x), pre_logits=True))
            model.reset_classifier(num_classes)
        return Built(model, self.source_label(ref, source), ref.data_config())


FORMAT = TransformersFormat(
    name="hf", prefixes=("hf:",), module="transformers", extra="hf", config_file="config.json",
    weights_files=("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json"),
    features=("cls", "mean", "pooler"),
    feature_help="cls: the final CLS token; mean: the mean of the patch tokens; pooler: the "
                 "model's own pooled output (SigLIP's attention pool)")
