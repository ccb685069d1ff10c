"""Zero-shot classification (`--method zero-shot`) of CLIP-family backbones from class names
(medfm.probe.zeroshot): no training subset, one run per store, keyed by its prompts.

Over matching stores it runs on those of CLIP-family checkpoints' image embeddings and skips
the others; a named store (`--store`) it cannot read, or finding none, is one line saying why.
The key's params hold the templates (DEFAULT_TEMPLATES, or a file's lines) and, when given,
the class names, as text: the same prompts from another file are the same run; the file's path
is not part of it.
"""

from __future__ import annotations

import numpy as np

from medfm.data import Task, get_dataset
from medfm.probe.methods import Fitted, register
from medfm.probe.zeroshot.classify import ZeroShotClassifier
from medfm.probe.zeroshot.text import refusal, text_embeddings
from medfm.resolve.methods.zeroshot import METHOD_NAME
from medfm.resolve.prompts import class_prompts


def _fit(features: dict, labels: dict, task: Task, train_rows: np.ndarray, *, params: dict,
         selection: str, seed: int, solver: str, device: str | None, store) -> Fitted:

    info = get_dataset(store.request["dataset"])
    names = tuple(params["class_names"]) if "class_names" in params else None
    sets = class_prompts(info, tuple(params["templates"]), names)
    text = text_embeddings(store, [t for prompts in sets for t in prompts])
    model = ZeroShotClassifier(text=text, n_sets=len(sets), task=task)
    scores = model.predict_proba(np.asarray(features["test"])).astype(np.float32)
    extra = {"prompts": [list(p) for p in sets], "logit_scale": text.logit_scale,
             "logit_bias": text.logit_bias, "text_cached": text.cached}
    return Fitted(scores, None, extra, "", "cpu", model=model)


def _refuses(store) -> str | None:

    return refusal(store)


METHOD = register(METHOD_NAME, fit=_fit, refuses=_refuses)
