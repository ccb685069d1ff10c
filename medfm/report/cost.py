"""The report's "Cost" section: what each grid run was estimated to cost before it ran, against
the job hours it took (medfm.throughput.grid_runs: one line per grid run, written by the grid
driver into the work directory).

One row per (grid run, stage) that ran jobs: the device, jobs run (failed), estimated and actual
job hours and the estimate's error in percent of the actual. The estimate covers the jobs the
run planned; a run stopped early (a failed job, a kill) has spent less than it planned, which
the failed column shows.
"""

from __future__ import annotations

from medfm.report.tables import Table
from medfm.throughput import GRID_RUNS_FILE, grid_runs

HEADING = "Cost: estimated vs actual"
STAGES = ("extract", "probe", "finetune")
NO_RUNS = (f"No grid run recorded in this work directory ({GRID_RUNS_FILE}): cost estimates are "
           "compared with the hours spent only for runs of `medfm grid`.")


def cost_table(workdir) -> Table | None:
    """The table of every recorded grid run's stages, or None when none was recorded."""
    rows = []
    for run in grid_runs(workdir):
        estimated, actual, jobs = run["estimated_s"], run["actual_s"], run.get("jobs", {})
        for stage in STAGES:
            est, got = float(estimated.get(stage, 0.0)), float(actual.get(stage, 0.0))
            if not jobs.get(stage) and got == 0:
                continue
            error = f"{100 * (est - got) / got:+.0f}" if got > 0 else "—"
            rows.append((str(run.get("time", "")), str(run.get("device", "")), stage,
                         f"{jobs.get(stage, 0)}", f"{est / 3600:.3f}", f"{got / 3600:.3f}",
                         error))
    if not rows:
        return None
    return Table(name="cost", title="Grid runs: estimated vs actual job hours per stage",
                 header=("run", "device", "stage", "jobs", "estimated (h)", "actual (h)",
                         "error (%)"),
                 rows=tuple(rows), bold=tuple((False,) * 7 for _ in rows))


def cost_section(workdir) -> tuple[str, list[str], list[Table]]:
    """(heading, notes, tables) of the report's cost section."""
    table = cost_table(workdir)
    if table is None:
        return HEADING, [NO_RUNS], []
    return HEADING, [__doc__.split("\n\n", 1)[1].strip().replace("\n", " ")], [table]
