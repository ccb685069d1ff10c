"""The fine-tune stage: end-to-end training as resumable batch jobs, with the references' recipes.

    from medfm.finetune import finetune
    finetune(datasets=["breastmnist"], backbones=["resnet18"], sizes=[28], recipe="medmnist-v2",
             weights="random", seeds=(0, 1, 2))
"""

from medfm.finetune.recipes import RECIPES, Recipe, resolve_recipe
from medfm.finetune.run import (
    FinetuneReport,
    finetune,
    finetune_done,
    finetune_job,
    finish_checkpoint,
)
from medfm.finetune.train import Split, TrainOutcome, train

__all__ = [
    "RECIPES",
    "FinetuneReport",
    "Recipe",
    "Split",
    "TrainOutcome",
    "finetune",
    "finetune_done",
    "finetune_job",
    "finish_checkpoint",
    "resolve_recipe",
    "train",
]
