"""The fine-tune stage: end-to-end training as resumable batch jobs, with the references' recipes.

    from medfm.finetune import finetune
    finetune(datasets=["breastmnist"], backbones=["resnet18"], sizes=[28], recipe="medmnist-v2",
             weights="random", seeds=(0, 1, 2))

Recipes load with the package (they are plain data); the training code imports torch and timm,
so it loads on first use.
"""

import sys
import types

# requests and recipes are resolved below every stage (medfm.resolve); offered here as well
from medfm.resolve.finetune import FinetuneRequest, finetune_requests, resolve_finetune
from medfm.resolve.recipes import RECIPES, Recipe, resolve_recipe

_RUN = ("FinetuneReport", "finetune", "finetune_job", "finish_checkpoint")
_TRAIN = ("Split", "TrainOutcome", "train")


def __getattr__(name: str):
    if name in _RUN or name in _TRAIN:
        import importlib

        for module, names in (("medfm.finetune.run", _RUN), ("medfm.finetune.train", _TRAIN)):
            if name in names:
                loaded = importlib.import_module(module)
                # bind every name the module exports: importing medfm.finetune.train sets this
                # package's `train` to the submodule, which would shadow the function
                globals().update({n: getattr(loaded, n) for n in names})
        return globals()[name]
    raise AttributeError(f"module 'medfm.finetune' has no attribute {name!r}")


class _Package(types.ModuleType):
    """This package, whose `train` is always the function: importing the submodule
    medfm.finetune.train (as medfm.finetune.run does) would otherwise set the package's `train`
    to the module (the import system binds submodules on their parent); it stays importable
    through sys.modules."""

    def __setattr__(self, name, value):
        if name == "train" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["RECIPES", "FinetuneRequest", "Recipe", "finetune_requests", "resolve_finetune",
           "resolve_recipe", *_RUN, *_TRAIN]
