"""Every kind of key medfm builds, enumerated from inputs (used by tests/test_resolve.py).

`cases(data_root)` maps a case name to the digest its inputs resolve to today. The digests of
the code that wrote the first work directories are pinned in tests/fixtures/keys.json (written
by `python tests/keycases.py`, once, before the resolution layer moved): every key built today
must be built the same way, or old work directories would recompute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from medfm.grid.plan import plan_grid
from medfm.grid.spec import preset_spec, spec_from_dict
from medfm.resolve import (PRESETS, RECIPES, SubsetSpec, finetune_requests, resolve_store_request,
                           run_key)
from medfm.resolve.probe import resolve_probe

FIXTURE = Path(__file__).parent / "fixtures" / "keys.json"
BACKBONES = ("resnet18", "vit_small_patch16_224")
PREPROCESS = {"default": {}, "pad64": {"resize_policy": "pad", "input_size": 64},
              "half": {"normalize": "half"}}
FINGERPRINT = "0123456789abcdef"


def _api_finetunes(data_root) -> dict[str, str]:
    out = {}
    for recipe in RECIPES:
        for pname, prep in PREPROCESS.items():
            for oname, overrides in (("none", {}), ("epochs2", {"epochs": 2})):
                for lora in (False, True):
                    if lora and recipe == "medmnist-v2":
                        continue  # from scratch: nothing to adapt
                    requests, _ = finetune_requests(
                        backbones=BACKBONES, sizes=[28], datasets=["breastmnist"],
                        fractions=[0.1, 1.0], shots=[5], seeds=[0, 1], recipe=recipe,
                        overrides=overrides, lora=lora, data_root=data_root, **prep)
                    for r in requests:
                        out[f"finetune/{recipe}/{pname}/{oname}/lora={lora}/{r.label}"] = \
                            r.key().digest()
    for preset in PRESETS:
        requests, _ = finetune_requests(backbones=BACKBONES, sizes=[28],
                                        datasets=["breastmnist"], preset=preset,
                                        data_root=data_root)
        for r in requests:
            out[f"finetune/preset={preset}/{r.label}"] = r.key().digest()
    return out


def _probe_keys() -> dict[str, str]:
    store = resolve_store_request(dataset="breastmnist", size=28, backbone="resnet18",
                                  data_root=_ROOT[0]).identity()
    from medfm.data import get_dataset
    from medfm.resolve.methods import get_method_spec as get_method

    task = get_dataset("breastmnist").task
    out = {}
    variants = [("logreg", {}), ("logreg", {"selection": "holdout"}),
                ("knn", {}), ("knn", {"knn_metric": "euclidean", "knn_vote": "majority"})]
    for method, options in variants:
        probe = resolve_probe(method, **options)
        params = json.loads(probe.params)
        for spec in (SubsetSpec(fraction=0.1, seed=1), SubsetSpec(shots=5, seed=0),
                     SubsetSpec(fraction=0.01, seed=2, sampler="first-per-class")):
            key = run_key(store=store, store_fingerprint=FINGERPRINT, method=probe.method,
                          params=params, selection=probe.selection,
                          select_metric=get_method(method).select_metric(task, params),
                          spec=spec)
            subset = (f"SubsetSpec(fraction={spec.fraction!r}, shots={spec.shots!r}, "
                      f"seed={spec.seed!r}, sampler={spec.sampler!r})")  # as first pinned
            out[f"probe/{method}/{sorted(options.items())}/{subset}"] = key.digest()
    return out


def _store_keys(data_root) -> dict[str, str]:
    from medfm.preprocess import PreprocessRequest

    out = {}
    for backbone in BACKBONES:
        for pname, prep in PREPROCESS.items():
            for dtype in ("float16", "float32"):
                for precision in ("float32", "bfloat16"):
                    r = resolve_store_request(dataset="breastmnist", size=28, backbone=backbone,
                                              preprocess=PreprocessRequest(**prep), dtype=dtype,
                                              precision=precision, data_root=data_root)
                    out[f"store/{backbone}/{pname}/{dtype}/{precision}"] = r.filename()
    return out


def _grid_keys(data_root, workdir) -> dict[str, str]:
    out = {}
    for preset in PRESETS:
        spec = preset_spec(preset, datasets=["breastmnist"], sizes=[28],
                           backbones=list(BACKBONES), data_root=str(data_root))
        for job in plan_grid(spec, workdir=workdir).jobs:
            if job.kind == "finetune":
                out[f"grid/preset={preset}/{job.label}"] = job.request.key().digest()
            elif job.kind == "extract":
                out[f"grid/preset={preset}/{job.label}"] = job.request.filename()
    for recipe in RECIPES:
        for pname, prep in PREPROCESS.items():
            spec = spec_from_dict({
                "datasets": ["breastmnist"], "sizes": [28], "backbones": list(BACKBONES),
                "fractions": [0.1, 1.0], "seeds": [0, 1], "methods": ["finetune", "head-probe"],
                "finetune": {"recipe": recipe, "overrides": {"epochs": 2}},
                "data_root": str(data_root), **prep})
            for job in plan_grid(spec, workdir=workdir).jobs:
                if job.kind == "finetune":
                    out[f"grid/{recipe}/{pname}/{job.label}"] = job.request.key().digest()
    return out


def _corrupted_keys(data_root) -> dict[str, str]:
    """The file names of corrupted test splits beside a store (MedMNIST-C siblings)."""
    from types import SimpleNamespace

    from medfm.robust.stores import corrupted_identity, corrupted_path

    request = resolve_store_request(dataset="breastmnist", size=28, backbone="resnet18",
                                    data_root=data_root)
    store = SimpleNamespace(request=request.identity(), fingerprint=FINGERPRINT,
                            path=Path("stores") / request.filename())
    out = {}
    for pairs in ([("pixelate", 3)], [("gaussian_noise", 1), ("pixelate", 5)]):
        for seed, base in ((0, None), (1, "breastmnist")):
            identity = corrupted_identity(store, pairs, seed=seed, corruption_set="medmnist-c",
                                          base=base, version="0.1.0")
            out[f"corrupted/{pairs}/{seed}/{base}"] = corrupted_path(store, identity).name
    return out


_ROOT = [None]


def cases(data_root, workdir) -> dict[str, str]:
    """Case name -> key digest (or store file name) of every case, built by today's code."""
    _ROOT[0] = data_root
    return {**_api_finetunes(data_root), **_probe_keys(), **_store_keys(data_root),
            **_grid_keys(data_root, workdir), **_corrupted_keys(data_root)}


if __name__ == "__main__":  # pin today's keys: python tests/keycases.py DATA_ROOT WORKDIR
    FIXTURE.write_text(json.dumps(cases(Path(sys.argv[1]), Path(sys.argv[2])), indent=0,
                                  sort_keys=True) + "\n")
