"""The resolution layer: what a user asked for -> canonical, frozen requests -> their keys.

Every stage (extract, probe, finetune), the grid, the CLI and the Python API resolve here, and
nothing else resolves. Resolving loads no model, no image and no feature: it reads dataset files'
digests, medfm's snapshot of timm's registry and the store index, so "is this done?" is answered
before any work starts (medfm.store.done).

    from medfm.resolve import resolve_store_request, finetune_requests, run_key
    store = resolve_store_request(dataset="breastmnist", size=28, backbone="resnet18")
    requests, missing = finetune_requests(backbones=["resnet18"], sizes=[28], preset="seed-paper")

Modules (each imports only those above it in this list, and the foundation modules data,
backbones, preprocess, sampling, runtime, errors, limits):

- `defaults`: every default a run's identity depends on (seeds per stage, the probe method, the
  recipe, bootstrap resamples, the C grid) and `LATER_KEY_FIELDS`, the table of settings added
  after the first release with the values that mean "as before" (keyed only where different).
- `keys`: `ResultKey`, `canonical_json`, `run_key`, store identities, digests and file names.
- `recipes`: fine-tune recipes (training settings) and their resolution from names + overrides.
- `methods`: the probe methods' declarations: name, settings that enter the key, selections,
  options, how reports draw them (their fitting lives in medfm.probe.methods).
- `presets`: the published protocols (seed-paper, medmnist-plus): one vocabulary for "preset".
- `store`: `StoreRequest`, an extraction resolved.
- `finetune`: `FinetuneRequest` and the one path from CLI/API/grid arguments to fine-tune runs.

Where to change what:
- a new default, or a setting added to a key: `defaults` (add it to LATER_KEY_FIELDS with the
  value that means "as before", so old work directories keep their keys);
- a new probe method: its declaration here in `methods/<name>.py` and its fitting in
  medfm/probe/methods/<name>.py (tests: tests/test_probe.py, tests/test_resolve.py);
- a new recipe or preset: `recipes.py` / `presets.py` (docs/presets.md for the references);
- a new backbone format or dataset source: not here (medfm/backbones, medfm/data): the layer
  reads their refs.
"""

# names offered here, by module; loaded on first use, so importing one module of this package
# (medfm.resolve.defaults from the CLI) does not load the dataset catalogue or timm's registry
_EXPORTS = {
    "medfm.resolve.defaults": ("C_GRID", "N_BOOTSTRAP", "PROBE_METHOD", "RECIPE", "default_seeds",
                               "keyed_later"),
    "medfm.resolve.finetune": ("FinetuneRequest", "finetune_requests", "resolve_finetune",
                               "resolve_finetunes"),
    "medfm.resolve.keys": ("RESULT_KEY_FIELDS", "ResultKey", "canonical_json", "run_key"),
    "medfm.resolve.presets": ("PRESETS", "Preset", "get_preset"),
    "medfm.resolve.probe": ("ProbeRequest", "resolve_probe"),
    "medfm.resolve.recipes": ("RECIPES", "Recipe", "resolve_recipe"),
    "medfm.resolve.store": ("StoreRequest", "resolve_store_request"),
    "medfm.sampling": ("SubsetSpec",),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)


def __getattr__(name: str):
    for module, names in _EXPORTS.items():
        if name in names:
            import importlib  # (a name of this package asked for: load its module)

            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'medfm.resolve' has no attribute {name!r}")
