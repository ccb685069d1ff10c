"""The text half of a CLIP-family checkpoint, and the text-embedding cache next to a store.

    tower = load_text_tower(store)           # the checkpoint the store's images were embedded with
    emb = tower.encode(["a medical image of pneumonia."])      # (T, D) float32, unnormalized
    tower.logit_scale, tower.logit_bias

    emb, scale, bias = text_embeddings(store, prompt_sets)     # cached: computed once per store

Which checkpoint. A store records the backbone as the user named it (`backbone_name`) and its
identity (canonical id and weights digest); the text tower is loaded from that name, offline as
the extraction was (hub cache or folder), and must resolve to the same identity, else the
checkpoint changed since the extraction and zero-shot refuses with one line.

Image embeddings. OpenCLIP: the store's features must be `?features=embed` (model.encode_image's
output, the projected embedding). Transformers: `?features=pooler` (the vision model's pooled
output); CLIP's `visual_projection` is applied here, so the image embedding is what
`get_image_features` gives (SigLIP has no projection: its pooled output is the embedding).
Any other features say so and name the store to extract.

Text embeddings: OpenCLIP `model.encode_text(tokenizer(texts))` with `open_clip.get_tokenizer`
of the same checkpoint; Transformers `model.get_text_features(**tokenizer(texts))` with its
AutoTokenizer (SigLIP: padded to its text model's max_position_embeddings, as it was trained and
as it pools the last token; CLIP: to the longest prompt).
Logit scale: the model's `logit_scale.exp()`; bias: SigLIP's `logit_bias` (0 for CLIP).
Cache: `<store>.zero-shot/<digest>.npz` (digest of the backbone identity and the texts), written
atomically; a rerun, another method setting with the same prompts, or a corrupted split reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfm.backbones.formats import format_for
from medfm.backbones.hub import CheckpointFormat, SourceName
from medfm.backbones.names import RANDOM, resolve_backbone
from medfm.errors import InvalidArgumentError, MedfmError, StoreError, WeightsError
from medfm.resolve.keys import canonical_json

CACHE_SUFFIX = ".zero-shot"  # <store stem>.zero-shot/ holds its text embeddings
CACHE_VERSION = 1  # part of every cache digest: bump when the computation changes
IMAGE_FEATURES = {"open_clip": "embed", "hf": "pooler"}  # what zero-shot reads, per format
TEXT_BATCH = 256  # prompts per forward pass


def _parsed(name: str) -> SourceName | None:
    """The parsed checkpoint name of a hub or folder checkpoint (None: a timm registry name)."""
    fmt = format_for(name) if name else None
    return fmt.parse(name) if isinstance(fmt, CheckpointFormat) else None


def _source(store) -> tuple[str, str, str]:
    """(format, features, backbone name) of a store's backbone; one line when zero-shot cannot
    use it."""
    name = str(store.attrs.get("backbone_name") or "")
    backbone = store.request["backbone"]
    parsed = _parsed(name)
    if parsed is None or parsed.format.name not in IMAGE_FEATURES:
        raise InvalidArgumentError(
            f"zero-shot needs a CLIP-family checkpoint with a text tower (open_clip:... or "
            f"hf:... CLIP/SigLIP); store {store.path.name} holds {backbone}.")
    source = parsed
    wanted = IMAGE_FEATURES[source.format.name]
    if source.features != wanted:
        raise InvalidArgumentError(
            f"zero-shot reads the image embeddings ({source.format.name}: ?features={wanted}); "
            f"store {store.path.name} holds ?features={source.features}. Extract them once: "
            f"medfm extract --backbone '{name.partition('?')[0]}?features={wanted}' ...")
    return source.format.name, wanted, name


def refusal(store) -> str | None:
    """Why zero-shot cannot read `store` (None: it can), without loading anything."""
    try:
        _source(store)
    except MedfmError as err:
        return str(err)
    return None


def _ref(store, name: str):
    """The BackboneRef of `name`, checked against the identity the store recorded."""
    weights = RANDOM if store.request["weights"] == RANDOM else None
    ref = resolve_backbone(name, weights)
    if (ref.id, ref.weights) != (store.request["backbone"], store.request["weights"]):
        raise WeightsError(
            f"{name!r} now resolves to {ref.id} with weights {ref.weights}, but store "
            f"{store.path.name} was embedded with {store.request['weights']}: the checkpoint "
            "changed since the extraction; re-extract the store, or restore the checkpoint.")
    return ref


@dataclass
class TextTower:
    """A loaded CLIP-family model's text side and how image embeddings are finished."""

    model: object  # the whole model (open_clip CLIP, or Transformers CLIPModel/SiglipModel)
    tokenize: object  # texts -> the model's text inputs
    fmt: str  # "open_clip" or "hf"
    logit_scale: float
    logit_bias: float

    def encode(self, texts: list[str]) -> np.ndarray:
        """(T, D) float32 text embeddings, unnormalized."""
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(texts), TEXT_BATCH):
                batch = self.tokenize(list(texts[start:start + TEXT_BATCH]))
                if self.fmt == "open_clip":
                    emb = self.model.encode_text(batch)
                else:
                    emb = self.model.get_text_features(**batch)
                    emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
                out.append(emb.float().cpu().numpy())
        return np.concatenate(out)

    def projection(self) -> np.ndarray | None:
        """(D, D_features) float32: the matrix that turns stored features into image embeddings
        (Transformers CLIP's bias-free visual_projection), or None where they already are."""
        layer = getattr(self.model, "visual_projection", None) if self.fmt == "hf" else None
        if layer is None:
            return None
        if getattr(layer, "bias", None) is not None:
            raise InvalidArgumentError("this checkpoint's visual projection has a bias; medfm "
                                       "reads bias-free CLIP projections only.")
        return layer.weight.detach().float().cpu().numpy()


def load_text_tower(store) -> TextTower:
    """The text tower of the checkpoint `store` was embedded with (module docstring)."""
    fmt, _, name = _source(store)
    ref = _ref(store, name)

    source = _parsed(name)
    source.format.require_extra(name)
    if fmt == "open_clip":
        return _open_clip(ref, source, name)
    return _transformers(ref, name)


def _open_clip(ref, source, name: str) -> TextTower:
    import open_clip

    pretrained = ref.weights != RANDOM
    where = (source.builtin[0] if source.builtin else f"local-dir:{ref.folder}")
    try:
        if source.builtin:
            model = open_clip.create_model(source.builtin[0],
                                           pretrained=source.builtin[1] if pretrained else None)
        else:
            model = open_clip.create_model(where, load_weights=pretrained)
        tokenizer = open_clip.get_tokenizer(where)
    except Exception as err:  # noqa: BLE001 - open_clip raises many types
        raise WeightsError(f"OpenCLIP cannot build the text tower of {name!r} "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:200]}).") from err
    model.eval()
    bias = getattr(model, "logit_bias", None)
    return TextTower(model, tokenizer, "open_clip", float(model.logit_scale.detach().exp()),
                     float(bias.detach()) if bias is not None else 0.0)


def _transformers(ref, name: str) -> TextTower:
    import transformers

    try:
        model = transformers.AutoModel.from_pretrained(ref.folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(ref.folder)
    except Exception as err:  # noqa: BLE001 - unknown model_type, no tokenizer files: many types
        raise WeightsError(f"Transformers cannot load {name!r} with its tokenizer from "
                           f"{ref.folder} ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:200]}).") from err
    if not hasattr(model, "get_text_features") or not hasattr(model, "logit_scale"):
        raise InvalidArgumentError(f"{name!r} ({model.config.model_type}) has no text tower; "
                                   "zero-shot needs a CLIP or SigLIP checkpoint.")
    model.eval()
    siglip = str(model.config.model_type).startswith("siglip")
    length = getattr(getattr(model.config, "text_config", None), "max_position_embeddings",
                     None)
    padding = {"padding": "max_length", "max_length": length} if siglip else {"padding": True}

    def tokenize(texts):
        return tokenizer(texts, truncation=True, return_tensors="pt", **padding)

    bias = getattr(model, "logit_bias", None)
    return TextTower(model, tokenize, "hf", float(model.logit_scale.detach().exp()),
                     float(bias.detach()) if bias is not None else 0.0)


def cache_path(store, texts: list[str]) -> Path:
    """Where the text embeddings of `texts` for `store`'s checkpoint are kept."""
    identity = {"version": CACHE_VERSION, "backbone": store.request["backbone"],
                "weights": store.request["weights"], "texts": list(texts)}
    digest = hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]
    return store.path.with_suffix(CACHE_SUFFIX) / f"{digest}.npz"


@dataclass(frozen=True)
class TextEmbeddings:
    """A prompt set's embeddings and the model's logit scale and bias."""

    embeddings: np.ndarray  # (T, D) float32, unnormalized, one row per text
    logit_scale: float
    logit_bias: float
    projection: np.ndarray | None  # stored features -> image embeddings (TextTower.projection)
    cached: bool  # read from the cache (nothing loaded)

    def image_embeddings(self, features: np.ndarray) -> np.ndarray:
        """Stored image features -> the model's image embeddings, float32."""
        features = np.asarray(features, dtype=np.float32)
        return features if self.projection is None else features @ self.projection.T


def text_embeddings(store, texts: list[str]) -> TextEmbeddings:
    """The embeddings of `texts` by `store`'s checkpoint: from the cache next to the store, or
    computed once (loading the text tower) and cached."""
    path = cache_path(store, texts)
    if path.is_file():
        try:
            with np.load(path) as npz:
                if json.loads(str(npz["texts"])) == list(texts):
                    projection = npz["projection"] if "projection" in npz.files else None
                    return TextEmbeddings(npz["embeddings"], float(npz["logit_scale"]),
                                          float(npz["logit_bias"]), projection, True)
        except (OSError, ValueError, KeyError):
            pass  # unreadable: recomputed and rewritten below
    _source(store)  # the checks, before the model loads
    tower = load_text_tower(store)
    embeddings, projection = tower.encode(list(texts)), tower.projection()
    image_dim = store.dim if projection is None else projection.shape[0]
    if (projection is not None and projection.shape[1] != store.dim) or \
            embeddings.shape[1] != image_dim:
        raise StoreError(f"the text embeddings ({embeddings.shape[1]}-wide) do not fit store "
                         f"{store.path.name}'s {store.dim}-wide image features.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    extra = {} if projection is None else {"projection": projection}
    np.savez(tmp, embeddings=embeddings, logit_scale=tower.logit_scale,
             logit_bias=tower.logit_bias, texts=json.dumps(list(texts)), **extra)
    os.replace(tmp, path)
    return TextEmbeddings(embeddings, tower.logit_scale, tower.logit_bias, projection, False)
