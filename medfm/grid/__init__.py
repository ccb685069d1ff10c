"""The grid stage: a spec (YAML or preset) -> planned extract/probe/finetune jobs -> an executor
(local, ray, slurm) -> rows in the registry, skipping whatever is already done."""

from medfm.grid.executors import EXECUTORS, LocalExecutor, RayExecutor, SlurmExecutor
from medfm.grid.plan import GridPlan, plan_grid
from medfm.grid.run import GridResult, run_grid, run_plan
from medfm.grid.spec import PRESETS, GridSpec, load_spec, preset_spec, spec_from_dict

__all__ = [
    "EXECUTORS", "PRESETS", "GridPlan", "GridResult", "GridSpec", "LocalExecutor",
    "RayExecutor", "SlurmExecutor", "load_spec", "plan_grid", "preset_spec", "run_grid",
    "run_plan", "spec_from_dict",
]
