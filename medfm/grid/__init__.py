"""The grid stage: a spec (YAML or preset) -> planned extract/probe/finetune jobs -> an executor
(local, ray, slurm) -> rows in the registry, skipping whatever is already done."""

from medfm.grid.executors import executors, make_executor
from medfm.grid.plan import GridPlan, plan_grid
from medfm.grid.run import GridResult, run_grid, run_plan
from medfm.grid.spec import PRESET_GRIDS, GridSpec, load_spec, preset_spec, spec_from_dict

__all__ = [
    "PRESET_GRIDS", "GridPlan", "GridResult", "GridSpec", "executors", "load_spec",
    "make_executor", "plan_grid", "preset_spec", "run_grid", "run_plan", "spec_from_dict",
]
