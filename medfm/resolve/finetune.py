"""Fine-tune requests: one path from what the user (the CLI, the Python API or a grid spec)
asked for to the runs it means and their keys.

    from medfm.resolve import finetune_requests
    requests, missing = finetune_requests(backbones=["resnet18"], sizes=[28],
                                          datasets=["breastmnist"], fractions=[0.1], seeds=[0])
    requests[0].key()       # the run's ResultKey, before any model or image loads

`resolve_finetunes` is the one place that turns (datasets, backbones, subsets, recipe, recipe
overrides, preprocessing, weights, preset, frozen) into `FinetuneRequest`s; `medfm finetune`,
`finetune()` and the grid's fine-tune and head-probe jobs all call it, so a run planned by one
is the same key, and "done", for the others. The rules, each written once:

- **Recipe**: the named recipe (medfm.resolve.recipes) with, in order of increasing precedence,
  the preset's settings for the backbone, the user's overrides, and `freeze_backbone` for a
  head-probe.
- **Weights**: a recipe that trains from scratch (`pretrained=false`) loads a seeded random
  init; weights given to it are an error (`weights_for`).
- **Preprocessing**, field by field, each later one winning: the recipe's, the preset's rule for
  the backbone, the user's request (`--resize-policy/--input-size/--normalize`, a grid's
  top-level fields), the recipe overrides' own preprocessing fields (a grid's
  `finetune.overrides`). A field given both as a request and as an override with different
  values is an error on the command line (`finetune_requests`).
- **Preset** (medfm.resolve.presets): its recipe, sampler, seeds and subsets where the user gave
  none; a different recipe or sampler is an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from medfm.backbones.names import RANDOM, BackboneRef, resolve_backbone
from medfm.data import DatasetRef, get_dataset, resolve_dataset, resolve_datasets
from medfm.errors import InvalidArgumentError
from medfm.preprocess import PreprocessConfig, PreprocessRequest
from medfm.resolve.defaults import RECIPE, default_seeds
from medfm.resolve.keys import ResultKey, input_identity, run_key
from medfm.resolve.presets import Preset, get_preset
from medfm.resolve.recipes import LORA_RANK, PREPROCESS_FIELDS, Recipe, resolve_recipe
from medfm.sampling import SubsetSpec, expand_subsets


@dataclass(frozen=True)
class FinetuneRequest:
    """One fine-tune run, resolved: what it trains on, from which weights, by which recipe."""

    dataset: DatasetRef
    backbone: BackboneRef
    recipe: Recipe  # resolved, its preprocessing fields merged with the user's
    preprocess: PreprocessConfig  # the recipe's preprocessing resolved for the backbone
    spec: SubsetSpec

    @property
    def select_metric(self) -> str:
        """The checkpoint metric: the recipe's, "primary" resolved for the dataset."""
        if self.recipe.select_metric == "primary":
            return get_dataset(self.dataset.name).primary_metric
        return self.recipe.select_metric

    def key(self) -> ResultKey:
        return run_key(store=input_identity(self.dataset, self.backbone, self.preprocess,
                                            self.recipe.normalize),
                       feature_kind="", method=self.recipe.method,
                       params=self.recipe.key_params(),
                       selection="val", select_metric=self.select_metric, spec=self.spec)

    @property
    def label(self) -> str:
        """"breastmnist@28 resnet18.a1_in1k f=0.1 seed 0", as progress bars name the run."""
        s = self.spec
        subset = f"f={s.fraction:g}" if s.fraction is not None else f"k={s.shots}"
        return f"{self.dataset.label} {self.backbone.id} {subset} seed {s.seed}"


def weights_for(recipe: Recipe, weights: str | None) -> str | None:
    """The weights to load: a from-scratch recipe forces a seeded random init."""
    if recipe.pretrained:
        return weights
    if weights is None or weights.strip().lower() in ("random", "none"):
        return RANDOM
    raise InvalidArgumentError(
        f"recipe {recipe.name!r} trains from scratch (pretrained=false) but weights {weights!r} "
        "were given; drop --weights, or override pretrained=true to fine-tune them.")


def resolve_finetune(*, dataset: str | DatasetRef, backbone: str | BackboneRef, spec: SubsetSpec,
                     recipe: Recipe, size: int | None = None, weights: str | None = None,
                     preprocess: PreprocessRequest | None = None,
                     data_root: str | os.PathLike | None = None) -> FinetuneRequest:
    """One fine-tune, resolved without loading a model or an image. `recipe` is resolved;
    `preprocess` overrides the recipe's preprocessing field by field (None: the recipe's)."""
    ref = dataset if isinstance(dataset, DatasetRef) else resolve_dataset(dataset, size, data_root)
    model = backbone if isinstance(backbone, BackboneRef) else resolve_backbone(
        backbone, weights_for(recipe, weights))
    merged = recipe.preprocess.merged(preprocess)
    config = merged.resolve(model.data_config(), source_size=ref.size)
    return FinetuneRequest(ref, model, recipe.with_preprocess(merged), config, spec)


def _own_preprocess(overrides: dict) -> PreprocessRequest:
    """The preprocessing fields among recipe overrides, as a request."""
    return PreprocessRequest(*(overrides.get(name) for name in PREPROCESS_FIELDS))


def resolve_finetunes(*, datasets: Sequence[DatasetRef], backbones: Sequence[str | BackboneRef],
                      subsets: Sequence[SubsetSpec], recipe: str | Recipe = RECIPE,
                      overrides: dict | None = None, preprocess: PreprocessRequest | None = None,
                      weights: str | None = None, preset: str | Preset | None = None,
                      frozen: bool = False) -> list[FinetuneRequest]:
    """Every (backbone, dataset, subset) fine-tune, by the rules of the module docstring.
    `frozen`: a head-probe (the head trained through the frozen backbone)."""
    found = get_preset(preset) if isinstance(preset, str) else preset
    overrides = {**(overrides or {}), **({"freeze_backbone": True} if frozen else {})}
    base = resolve_recipe(recipe, **overrides)
    requests = []
    for backbone in backbones:
        name = backbone.name if isinstance(backbone, BackboneRef) else backbone
        if isinstance(backbone, BackboneRef) and (base.pretrained or weights is not None):
            ref = backbone
        else:
            ref = resolve_backbone(name, weights_for(base, weights))
        rules = found.recipe_overrides(ref, frozen=base.freeze_backbone) if found else {}
        resolved = resolve_recipe(recipe, **{**rules, **overrides}) if rules else base
        wanted = (found.preprocess(ref) if found else PreprocessRequest()).merged(
            preprocess).merged(_own_preprocess(overrides))
        requests += [resolve_finetune(dataset=d, backbone=ref, spec=spec, recipe=resolved,
                                      preprocess=wanted) for d in datasets for spec in subsets]
    return requests


def _check_preset(found: Preset | None, recipe, sampler: str | None) -> None:
    """Nothing the user gave may differ from preset `found`: the recipe and the sampler."""
    if found is None:
        return
    given = recipe.name if isinstance(recipe, Recipe) else recipe
    if given is not None and given != found.recipe:
        raise InvalidArgumentError(f"preset {found.name} fine-tunes with recipe {found.recipe!r}, "
                                   f"not {given!r}; drop --recipe (override fields with --set).")
    if sampler is not None and sampler != found.sampler:
        raise InvalidArgumentError(f"preset {found.name} draws subsets with sampler "
                                   f"{found.sampler!r}, not {sampler!r}; drop --sampler, or "
                                   "--preset.")


def _check_twice(preprocess: PreprocessRequest, overrides: dict) -> None:
    """A preprocessing field given both as a flag and as a recipe override, differently."""
    for name in PREPROCESS_FIELDS:
        flag, override = getattr(preprocess, name), overrides.get(name)
        if flag is not None and override is not None and str(flag) != str(override):
            raise InvalidArgumentError(
                f"{name} is given twice ({flag!r} and --set {name}={override!r}); give it once.")


def finetune_requests(
    *,
    backbones: Sequence[str],
    sizes: Sequence[int],
    datasets: Sequence[str] | None = None,
    fractions: Sequence[float] | None = None,
    shots: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    recipe: str | Recipe | None = None,
    overrides: dict | None = None,
    resize_policy: str | None = None,
    input_size: int | None = None,
    normalize: str | None = None,
    weights: str | None = None,
    lora: bool = False,
    data_root: str | os.PathLike | None = None,
    sampler: str | None = None,
    preset: str | None = None,
    frozen: bool = False,
) -> tuple[list[FinetuneRequest], list[str]]:
    """(every run `finetune` would train, the lines of default datasets skipped for want of
    their file), resolved without loading a model or an image. Arguments as
    medfm.finetune.finetune's; `frozen` trains the head through the frozen backbone."""
    found = get_preset(preset) if preset is not None else None
    _check_preset(found, recipe, sampler)
    if found is not None:
        recipe, sampler = found.recipe, found.sampler
        seeds = found.seeds if seeds is None else seeds
        if not fractions and not shots:
            fractions, shots = found.fractions, found.shots
    recipe = RECIPE if recipe is None else recipe
    overrides = dict(overrides or {})
    if lora and not resolve_recipe(recipe, **overrides).lora_rank:
        if "lora_rank" in overrides:
            raise InvalidArgumentError("LoRA needs lora_rank >= 1; drop --lora-rank 0, or --lora.")
        overrides["lora_rank"] = LORA_RANK
    preprocess = PreprocessRequest(resize_policy, input_size, normalize)
    _check_twice(preprocess, overrides)
    refs, missing = resolve_datasets(datasets, sizes, data_root)
    subsets = expand_subsets(fractions, shots,
                             default_seeds("finetune") if seeds is None else seeds,
                             **({"sampler": sampler} if sampler else {}))
    requests = resolve_finetunes(datasets=refs, backbones=backbones, subsets=subsets,
                                 recipe=recipe, overrides=overrides, preprocess=preprocess,
                                 weights=weights, preset=found, frozen=frozen)
    return requests, list(missing)
