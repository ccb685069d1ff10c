"""The resolution layer (medfm.resolve): every key built the same way as before it existed, the
grid and the CLI resolving a fine-tune to one key and one "done", and layers that hold."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests import keycases
from medfm.cli import main
from medfm.grid.plan import plan_grid
from medfm.grid.spec import preset_spec, spec_from_dict
from medfm.resolve import PRESETS, RECIPES, finetune_requests
from medfm.resolve.defaults import LATER_KEY_FIELDS, SAMPLER, default_seeds
from medfm.sampling import SAMPLERS
from medfm.store.registry import Registry

PACKAGE = Path(__file__).resolve().parents[1] / "medfm"
BACKBONES = ["resnet18", "vit_small_patch16_224"]


def test_every_key_is_built_as_before(real_root, tmp_path):
    """1,000 keys (fine-tunes under every recipe and preset, with and without preprocessing and
    recipe overrides, LoRA; probes of logreg and kNN under each selection, subset kind and
    sampler; store names in each dtype and precision; grid jobs of each preset) equal the
    digests the code before the resolution layer built (tests/fixtures/keys.json)."""
    pinned = json.loads(keycases.FIXTURE.read_text())
    now = keycases.cases(real_root, tmp_path)
    assert set(now) == set(pinned)
    changed = sorted(name for name in pinned if now[name] != pinned[name])
    assert not changed, changed[:5]


def _grid_keys(spec, workdir) -> set[str]:
    return {job.request.key().digest() for job in plan_grid(spec, workdir=workdir).jobs
            if job.kind == "finetune"}


def _api_keys(**kwargs) -> set[str]:
    requests, _ = finetune_requests(**kwargs)
    return {r.key().digest() for r in requests}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_grid_and_cli_build_one_key_under_every_recipe(recipe, real_root, tmp_path):
    """With no preprocessing, with top-level preprocessing (flags / spec fields), and with
    preprocessing in the recipe overrides (--set / finetune.overrides); fine-tune and
    head-probe (--set freeze_backbone=true / method head-probe)."""
    cases = [({}, {}), ({"resize_policy": "pad", "input_size": 64}, {}),
             ({}, {"input_size": 32, "epochs": 2}), ({"normalize": "half"}, {"epochs": 3})]
    for top, overrides in cases:
        for frozen in (False, True):
            spec = spec_from_dict({
                "datasets": ["breastmnist"], "sizes": [28], "backbones": BACKBONES,
                "fractions": [0.1, 1.0], "seeds": [0, 1],
                "methods": ["head-probe" if frozen else "finetune"],
                "finetune": {"recipe": recipe, "overrides": overrides},
                "data_root": str(real_root), **top})
            grid = _grid_keys(spec, tmp_path)
            api = _api_keys(backbones=BACKBONES, sizes=[28], datasets=["breastmnist"],
                            fractions=[0.1, 1.0], seeds=[0, 1], recipe=recipe,
                            overrides={**overrides,
                                       **({"freeze_backbone": True} if frozen else {})},
                            data_root=real_root, **top)
            assert len(grid) == len(BACKBONES) * 4 and grid == api, (top, overrides, frozen)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_grid_and_cli_build_one_key_under_every_preset(preset, real_root, tmp_path):
    """A preset's grid and `medfm finetune --preset` (its recipe, per-backbone rules,
    preprocessing, sampler, seeds and subsets), also with the user's preprocessing layered on
    the preset's (a spec's `input_size`, `--input-size`)."""
    for top in ({}, {"input_size": 64}):
        spec = preset_spec(preset, datasets=["breastmnist"], sizes=[28], backbones=BACKBONES,
                           data_root=str(real_root))
        if top:
            spec = spec_from_dict({**{k: v for k, v in _as_dict(spec).items()}, **top})
        grid = {job.request.key().digest() for job in plan_grid(spec, workdir=tmp_path).jobs
                if job.kind == "finetune" and not job.request.recipe.freeze_backbone}
        api = _api_keys(backbones=BACKBONES, sizes=[28], datasets=["breastmnist"],
                        preset=preset, data_root=real_root, **top)
        assert grid and grid == api, (preset, top)


def _as_dict(spec) -> dict:
    """A GridSpec back as the mapping a YAML file would give."""
    fields = {name: getattr(spec, name) for name in spec.__dataclass_fields__}
    overrides, recipe = dict(fields.pop("overrides")), fields.pop("recipe")
    fields["probe_options"] = dict(fields["probe_options"])
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    return {**fields, "finetune": {"recipe": recipe, "overrides": overrides}}


def test_a_fine_tune_the_cli_ran_is_done_for_the_grid(real_root, tmp_path, capsys):
    """`medfm finetune` trains a run; the grid spec naming the same run plans 0 fine-tune jobs
    (and `medfm finetune` again skips it)."""
    args = ["--dataset", "breastmnist", "--size", "28", "--backbone", "test_resnet",
            "--weights", "random", "--fractions", "0.1", "--seeds", "0", "--recipe", "medfm",
            "--set", "epochs=1", "--set", "batch_size=16", "--input-size", "32",
            "--data-root", str(real_root), "--workdir", str(tmp_path), "--quiet"]
    assert main(["finetune", *args]) == 0
    (row,) = Registry.in_workdir(tmp_path).query()
    spec = spec_from_dict({
        "datasets": ["breastmnist"], "sizes": [28], "backbones": ["test_resnet"],
        "weights": "random", "fractions": [0.1], "seeds": [0], "methods": ["finetune"],
        "input_size": 32, "finetune": {"recipe": "medfm",
                                       "overrides": {"epochs": 1, "batch_size": 16}},
        "data_root": str(real_root)})
    plan = plan_grid(spec, workdir=tmp_path)
    assert plan.total["finetune"] == 1 and plan.done["finetune"] == 1 and not plan.jobs
    assert _grid_keys(spec, tmp_path / "elsewhere") == {row.key.digest()}
    capsys.readouterr()
    assert main(["finetune", *args]) == 0
    assert "0 run(s) trained, 1 already in the registry" in capsys.readouterr().out
    assert len(Registry.in_workdir(tmp_path).query()) == 1


def test_one_value_twice_is_refused(real_root):
    with pytest.raises(Exception, match="input_size is given twice"):
        finetune_requests(backbones=["resnet18"], sizes=[28], datasets=["breastmnist"],
                          input_size=64, overrides={"input_size": 32}, data_root=real_root)


def test_defaults_are_read_from_one_place():
    """The sampler the key leaves out is the sampling module's default; stages' seeds."""
    assert SAMPLERS[0] == SAMPLER == LATER_KEY_FIELDS[("run", "sampler")]
    assert default_seeds("probe") == (0, 1, 2) and default_seeds("finetune") == (0,)
    from medfm.grid.spec import DEFAULTS

    assert DEFAULTS["seeds"] == default_seeds("grid")


# -- layers ------------------------------------------------------------------------------------

STAGES = ("extract", "probe", "finetune", "report")  # talk only through stores and the registry
ABOVE = ("grid", "cli", "__main__")  # run the stages
# modules allowed to import a name from above their layer at call time (none yet)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the medfm modules it imports, at module level or inside functions alike."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name and target.startswith("medfm"):
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return out


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    assert _cycles(_imports()) == []


def test_no_stage_imports_another_and_nothing_below_imports_above():
    wrong = []
    for module, targets in _imports().items():
        mine = _group(module)
        for target in targets:
            theirs = _group(target)
            if theirs == mine:
                continue
            if mine in STAGES and theirs in STAGES:
                wrong.append(f"stage {module} imports stage {target}")
            elif mine not in STAGES + ABOVE and theirs in STAGES + ABOVE:
                wrong.append(f"{module} (below the stages) imports {target}")
            elif mine in STAGES and theirs in ABOVE:
                wrong.append(f"stage {module} imports {target}, which runs stages")
    assert wrong == []


def test_the_check_finds_a_cycle_and_a_stage_import():
    """The walk above sees imports inside functions and relative imports."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    imports = _imports()
    assert "medfm.resolve.keys" in imports["medfm.store.registry"]
    assert "medfm.resolve.presets" in imports["medfm.probe.run"]  # imported in a function


# -- a work directory written before the resolution layer --------------------------------------

OLD_WORKDIR = Path(__file__).parent / "fixtures" / "workdir-2026-12"  # medfm at 30b6896:
# a store (test_resnet, random weights) with MedMNIST-C pixelate siblings, logreg rows at 0.1 and
# 1.0 x seeds 0, 1 and a kNN row with kept probe states, fine-tunes under `medfm` (input 32) and
# `medmnist-v2`, a LoRA fine-tune, corrupted evaluations (best.pt files left out: 3 MB)
OLD_COMMANDS = [
    ["probe", "--dataset", "breastmnist", "--fractions", "0.1,1.0", "--seeds", "0,1"],
    ["probe", "--dataset", "breastmnist", "--method", "knn", "--fractions", "0.1", "--seeds",
     "0"],
    ["finetune", "--dataset", "breastmnist", "--size", "28", "--backbone", "test_resnet",
     "--weights", "random", "--fractions", "0.1", "--seeds", "0", "--set", "epochs=1", "--set",
     "batch_size=16", "--input-size", "32"],
    ["finetune", "--dataset", "breastmnist", "--size", "28", "--backbone", "test_resnet",
     "--weights", "random", "--fractions", "0.1", "--seeds", "0", "--recipe", "medmnist-v2",
     "--set", "epochs=1"],
    ["finetune", "--dataset", "breastmnist", "--size", "28", "--backbone", "test_resnet",
     "--weights", "random", "--fractions", "0.1", "--seeds", "0", "--lora", "--set", "epochs=1",
     "--set", "batch_size=16", "--input-size", "32"],
    ["extract", "--dataset", "breastmnist", "--size", "28", "--backbone", "test_resnet",
     "--weights", "random", "--corruptions", "pixelate"],
]


def test_an_old_work_directory_reruns_with_nothing_recomputed(real_root, tmp_path, capsys):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(OLD_WORKDIR, work)
    common = ["--workdir", str(work), "--quiet"]
    assert main(["results", "--corruptions", "--format", "json", "--workdir", str(work)]) == 0
    before = json.loads(capsys.readouterr().out)
    assert len(before) == 43 and {r["method"] for r in before} == {"logreg", "knn", "finetune",
                                                                    "lora"}
    stores = {p: p.stat().st_mtime_ns for p in (work / "stores").rglob("*.h5")}
    for command in OLD_COMMANDS:
        extra = ["--data-root", str(real_root)] if command[0] != "probe" else []
        assert main([*command, *common, *extra]) == 0, command
    out = capsys.readouterr().out
    trained = [line for line in out.splitlines() if "run(s) trained" in line]
    assert len(trained) == 3 and all(line.startswith("0 run(s) trained") for line in trained)
    assert main(["results", "--corruptions", "--format", "json", "--workdir", str(work)]) == 0
    assert json.loads(capsys.readouterr().out) == before  # no row added, none changed
    assert {p: p.stat().st_mtime_ns for p in (work / "stores").rglob("*.h5")} == stores
    assert not (work / "checkpoints").exists()  # nothing trained
    spec = spec_from_dict({
        "datasets": ["breastmnist"], "sizes": [28], "backbones": ["test_resnet"],
        "weights": "random", "fractions": [0.1, 1.0], "seeds": [0, 1],
        "methods": ["logreg"], "data_root": str(real_root)})
    plan = plan_grid(spec, workdir=work)
    assert plan.done == {"extract": 1, "probe": 4, "finetune": 0} and not plan.jobs


def _inner_imports_without_a_reason() -> list[str]:
    """medfm imports made inside a function with no comment saying why: on the import's lines,
    or on the line above the run of import lines it belongs to."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom):
                    internal = node.level > 0 or (node.module or "").startswith("medfm")
                elif isinstance(node, ast.Import):
                    internal = any(a.name.startswith("medfm") for a in node.names)
                else:
                    continue
                if not internal:
                    continue
                own = lines[node.lineno - 1:node.end_lineno]
                above = node.lineno - 2
                while above >= 0 and lines[above].strip().startswith(("from ", "import ")):
                    above -= 1
                reason = above >= 0 and lines[above].strip().startswith("#")
                if not reason and not any("#" in line for line in own):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_every_import_inside_a_function_says_why():
    """An import inside a function keeps a heavy dependency (torch, h5py, the dataset catalogue,
    a verb's stage) off a path that does not need it, and says so; none breaks a cycle (the
    cycle check above counts them)."""
    assert _inner_imports_without_a_reason() == []
