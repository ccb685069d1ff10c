"""timm's checkpoint format, on the Hugging Face Hub or in a local folder: `config.json` (the
architecture and its pretrained_cfg) and `model.safetensors`, as timm's `push_to_hf_hub` /
`save_for_hf` write them; built by timm.create_model("hf-hub:..." / "local-dir:...").

    hf-hub:timm/tf_efficientnet_lite1.in1k     id "hf-hub:timm--tf_efficientnet_lite1.in1k"
    local-dir:/models/my_vit                   id "local-dir:my_vit"

`--weights FILE` loads a checkpoint file into the architecture the folder's config names.
"""

from __future__ import annotations

from pathlib import Path

from medfm.backbones.formats.base import Built
from medfm.backbones.hub import (IMAGE_SIZE, CheckpointFormat, SourceName, data_config,
                                 square_side)
from medfm.backbones.ref import RANDOM, BackboneRef
from medfm.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's defaults for a pretrained_cfg without them
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILD_ERRORS = (OSError, RuntimeError, ValueError, KeyError)  # what timm raises on bad files
WHY_CHARS = 200  # of timm's own error message quoted in a WeightsError


def timm_data_config(config: dict, name: str, where: Path) -> dict:
    """What timm.data.resolve_model_data_config gives for a model built from a hub config.json
    (the pretrained_cfg, with a fixed-size model's saved img_size, as timm applies it)."""
    if "architecture" not in config:
        raise WeightsError(f"backbone {name!r}: {where} names no timm 'architecture', so it is "
                           "not a timm-format config.json (for Transformers models use hf:).")
    cfg = dict(config.get("pretrained_cfg", config))
    args = config.get("model_args", {}) or {}
    size = cfg.get("input_size", (3, IMAGE_SIZE, IMAGE_SIZE))
    if args.get("img_size") is not None and cfg.get("fixed_input_size", False):
        size = (size[0], *((args["img_size"],) * 2 if isinstance(args["img_size"], int)
                           else args["img_size"]))
    side = square_side(list(size[1:]), name, where)
    return data_config(side, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD),
                       cfg.get("interpolation", "bicubic"))


class TimmHubFormat(CheckpointFormat):
    """hf-hub:org/name and local-dir:/path."""

    def id_prefix(self, source: SourceName) -> str:
        return "hf-hub:" if source.repo else "local-dir:"

    def read_data_config(self, source: SourceName, config: dict, config_path: Path,
                         name: str) -> tuple[dict, list[Path]]:
        return timm_data_config(config, name, config_path), []

    def build(self, ref: BackboneRef, *, num_classes: int, in_chans: int, init_seed: int,
              **timm_kwargs) -> Built:
        # torch and timm (seconds to import) load only when a model is built
        from timm.data import resolve_model_data_config

        # the checkpoints module imports torch and timm: loaded only to build a model
        from medfm.backbones.checkpoints import load_strict, read_checkpoint, seeded_create

        source = self.parse(ref.name)
        timm_name = f"hf-hub:{source.repo}" if source.repo else f"local-dir:{ref.folder}"
        label = self.source_label(ref, source)
        kwargs = dict(num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
        try:
            if ref.path is not None:
                model = seeded_create(timm_name, pretrained=False, init_seed=init_seed, **kwargs)
                load_strict(model, read_checkpoint(Path(ref.path)), origin=f"file {ref.path}")
                label = f"file:{ref.path}"
            else:
                model = seeded_create(timm_name, pretrained=ref.weights != RANDOM,
                                      init_seed=init_seed, **kwargs)
        except BUILD_ERRORS as err:
            raise WeightsError(f"timm cannot build {ref.name!r} from its files "
                               f"({type(err).__name__}: {str(err).splitlines()[0][:WHY_CHARS]})."
                               ) from err
        return Built(model, label, resolve_model_data_config(model))


FORMAT = TimmHubFormat(
    name="timm", prefixes=("hf-hub:", "local-dir:"), module="timm", extra="",
    config_file="config.json", weights_files=("model.safetensors", "pytorch_model.bin"),
    folder_prefixes=("local-dir:",), takes_weights_file=True)
