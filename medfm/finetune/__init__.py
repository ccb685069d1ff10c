"""The fine-tune stage: end-to-end training as resumable batch jobs, with the references' recipes.

    from medfm.finetune import finetune
    finetune(datasets=["breastmnist"], backbones=["resnet18"], sizes=[28], recipe="medmnist-v2",
             weights="random", seeds=(0, 1, 2))

Recipes load with the package (they are plain data); the training code imports torch and timm,
so it loads on first use.
"""

from medfm.finetune.recipes import RECIPES, Recipe, resolve_recipe

_RUN = ("FinetuneReport", "FinetuneRequest", "finetune", "finetune_job", "finish_checkpoint",
        "resolve_finetune")
_TRAIN = ("Split", "TrainOutcome", "train")


def __getattr__(name: str):
    if name in _RUN or name in _TRAIN:
        import importlib

        module = "medfm.finetune.run" if name in _RUN else "medfm.finetune.train"
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'medfm.finetune' has no attribute {name!r}")


__all__ = ["RECIPES", "Recipe", "resolve_recipe", *_RUN, *_TRAIN]
