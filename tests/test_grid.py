"""Grid: spec validation, presets, dry-run counts, executors (local, real Ray, submitit local)
giving identical results, a killed driver resuming without recomputation, failing jobs reported.

Run: .venv/bin/python -m pytest tests/test_grid.py -q
"""

from __future__ import annotations

import contextlib
import importlib.util

import numpy as np
import pytest

from medfm.cli import main
from medfm.errors import InvalidArgumentError, UnknownBackboneError
from medfm.grid import load_spec, plan_grid, preset_spec, run_grid, spec_from_dict
from medfm.grid.executors.local import LocalExecutor
from medfm.grid.spec import PRESET_GRIDS as PRESETS
from medfm.resolve.presets import MEDMNIST_PLUS_BACKBONES
from medfm.report import report
from medfm.store.registry import Registry
from medfm.synthetic import write_synthetic_npz

N_SPLITS = (32, 12, 16)  # synthetic train/val/test rows
TINY = {  # a grid that runs in seconds on 2 CPU cores
    "datasets": ["breastmnist"], "sizes": [28], "backbones": ["test_resnet"],
    "weights": "random", "fractions": [0.5, 1.0], "seeds": [0], "methods": ["logreg", "finetune"],
    "solver": "sklearn", "resize_policy": "native", "device": "cpu",
    "finetune": {"recipe": "medfm", "overrides": {"epochs": 1, "batch_size": 16,
                                                  "augment": False}},
}
METRIC_COLUMNS = ["acc", "auc", "balanced_acc", "n_train", "subset_digest"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid-data")
    write_synthetic_npz(root, "breastmnist", size=28, n=N_SPLITS)
    return root


def tiny(data_root, **changes):
    return spec_from_dict({**TINY, "data_root": str(data_root), **changes})


def results(workdir):
    frame = Registry.in_workdir(workdir).to_dataframe()
    keys = ["method", "fraction", "seed"]
    return frame.sort_values(keys)[keys + METRIC_COLUMNS].reset_index(drop=True)


@pytest.fixture(scope="module")
def pool():
    """One local executor (2 spawned workers) shared by the local-executor tests: workers are
    stateless, and starting them (importing torch) is most of a tiny grid's time."""
    executor = LocalExecutor(max_workers=2)
    yield executor
    executor.close()


@pytest.fixture(scope="module")
def local_run(data_root, pool, tmp_path_factory):
    """The tiny grid through the local executor: the reference every other executor matches."""
    workdir = tmp_path_factory.mktemp("local")
    result = run_grid(tiny(data_root), workdir=workdir, executor=pool, progress=False)
    return workdir, result


class DriverKilled(Exception):
    """Stands for the driver process dying."""


class DiesAfter:
    """The shared local executor, with the driver dying right after its `n`-th outcome."""

    name = "local"

    def __init__(self, inner: LocalExecutor, n: int) -> None:
        self.inner, self.n, self.seen = inner, n, 0

    def run(self, jobs):
        with contextlib.closing(self.inner.run(jobs)) as outcomes:
            for outcome in outcomes:
                yield outcome
                self.seen += 1
                if self.seen == self.n:
                    raise DriverKilled


def test_spec_validation_errors_say_what_to_fix(data_root):
    with pytest.raises(InvalidArgumentError, match="unknown spec field 'fraction'.*fractions"):
        spec_from_dict({**TINY, "fraction": [0.1]})
    with pytest.raises(InvalidArgumentError, match="lacks 'backbones'"):
        spec_from_dict({k: v for k, v in TINY.items() if k != "backbones"})
    with pytest.raises(InvalidArgumentError, match="methods=.*probe"):
        spec_from_dict({**TINY, "methods": ["probe"]})
    with pytest.raises(InvalidArgumentError, match="fraction"):
        spec_from_dict({**TINY, "fractions": [1.5]})
    with pytest.raises(InvalidArgumentError, match="recipe field"):
        spec_from_dict({**TINY, "finetune": {"overrides": {"epochz": 1}}})


def test_yaml_spec_and_relative_data_root(tmp_path, data_root):
    (tmp_path / "spec.yaml").write_text(
        "datasets: [breastmnist]\nsizes: [28]\nbackbones: [test_resnet]\n"
        f"data_root: {data_root.name}\nfractions: [0.1, 1.0]\nseeds: [0, 1]\n"
    )
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.methods == ("logreg",) and spec.solver == "auto"
    assert len(spec.subsets) == 4
    assert spec.data_root == str((tmp_path / data_root.name).resolve())


def test_presets_build_the_published_grids_and_narrow():
    plus = PRESETS["medmnist-plus"]
    assert plus.datasets is None and plus.sizes == (28, 64, 128, 224)  # every dataset present
    assert plus.resize_policy == "pad-norm" and plus.input_size == 224
    assert plus.methods == ("logreg", "knn", "head-probe", "finetune")
    assert plus.recipe == "medmnist-plus"
    seed = preset_spec("seed-paper", datasets=["breastmnist"], sizes=[28, 64])
    assert seed.datasets == ("breastmnist",) and seed.sizes == (28, 64)
    assert seed.seeds == (0, 1, 2) and seed.resize_policy == "bilinear"
    assert "dinov2_vitb14" in seed.backbones and seed.recipe == "seed-paper"
    narrow = preset_spec("medmnist-plus", backbones=["dino_vitb16"])
    assert narrow.backbones == ("dino_vitb16",)
    assert "vit_base_patch16_224.dino" in MEDMNIST_PLUS_BACKBONES
    with pytest.raises(InvalidArgumentError, match="did you mean 'seed-paper'"):
        preset_spec("seed_paper")


def test_dry_run_counts_every_job(data_root, tmp_path):
    spec = tiny(data_root, backbones=["test_resnet", "test_vit"], seeds=[0, 1])
    result = run_grid(spec, workdir=tmp_path, dry_run=True)
    plan = result.plan
    # 2 backbones -> 2 stores; 2 fractions x 2 seeds = 4 subsets per store and method
    assert plan.total == {"extract": 2, "probe": 8, "finetune": 8}
    assert plan.done == {"extract": 0, "probe": 0, "finetune": 0}
    # per store: fraction 0.5 x 2 seeds = 2 probe jobs, fraction 1.0's 2 seeds share 1 job
    assert len(plan.jobs) == 2 + 2 * 3 + 8
    assert result.outcomes == [] and len(Registry.in_workdir(tmp_path)) == 0
    text = plan.describe()
    assert "extract          2       0       2" in text
    assert "all             18       0      18" in text


def test_local_grid_runs_and_rerun_recomputes_nothing(local_run, data_root):
    workdir, result = local_run
    assert result.ok, result.summary()
    assert result.rows_added == 4  # 2 fractions x (logreg + finetune)
    frame = results(workdir)
    assert list(frame["method"]) == ["finetune", "finetune", "logreg", "logreg"]
    assert frame["acc"].between(0, 1).all()
    assert frame.loc[frame["method"] == "logreg", "auc"].min() > 0.9  # the probe learned
    registry = Registry.in_workdir(workdir)
    for row in registry.query():  # every row carries its per-sample test scores
        y_true, y_score = registry.scores(row.key)
        assert y_score.shape == (N_SPLITS[2], 2) and len(y_true) == N_SPLITS[2]
        assert np.allclose(y_score.sum(axis=1), 1, atol=1e-5)
    assert not list((workdir / "checkpoints").glob("*/last.pt"))  # finished: tidied
    assert len(list((workdir / "checkpoints").glob("*/best.pt"))) == 2
    plan = plan_grid(tiny(data_root), workdir=workdir)
    assert plan.jobs == () and plan.done == plan.total
    again = run_grid(tiny(data_root), workdir=workdir, progress=False)
    assert again.outcomes == [] and again.rows_added == 0 and again.ok


def test_killed_driver_resumes_only_missing_work(local_run, pool, data_root, tmp_path):
    """The driver dies after 4 of the 5 jobs have reported: the rerun plans and runs only the
    last one, and the rows recorded before the kill are kept as they are."""
    workdir, _ = local_run
    with pytest.raises(DriverKilled):
        run_grid(tiny(data_root), workdir=tmp_path, executor=DiesAfter(pool, 4), progress=False)
    before = Registry.in_workdir(tmp_path).to_dataframe()
    assert len(before) == 3  # 2 finetune rows + the first probe row (the extract adds none)
    plan = plan_grid(tiny(data_root), workdir=tmp_path)
    assert plan.done == {"extract": 1, "probe": 1, "finetune": 2}
    assert [job.kind for job in plan.jobs] == ["probe"]
    rest = run_grid(tiny(data_root), workdir=tmp_path, executor=pool, progress=False)
    assert rest.ok and rest.rows_added == 1
    assert [o.job for o in rest.outcomes] == list(plan.jobs)
    after = Registry.in_workdir(tmp_path).to_dataframe().set_index("digest")
    kept = after.loc[before["digest"], "created_at"]
    assert list(kept) == list(before["created_at"])  # not recomputed
    assert results(tmp_path).equals(results(workdir))


def test_failing_job_is_reported_while_the_rest_completes(pool, data_root, tmp_path):
    """A corrupt store: its extract job fails naming it, its probes do not run, the other
    backbone's jobs and every fine-tune complete."""
    spec = tiny(data_root, backbones=["test_resnet", "test_efficientnet"], fractions=[1.0])
    vit = next(j for j in plan_grid(spec, workdir=tmp_path).todo("extract")
               if j.where.endswith("test_efficientnet"))
    path = tmp_path / "stores" / vit.request.filename()
    path.parent.mkdir()  # planning creates nothing
    path.write_bytes(b"not an hdf5 file")
    result = run_grid(spec, workdir=tmp_path, executor=pool, progress=False)
    assert not result.ok
    failed = {o.job.label: o.error for o in result.failed}
    assert set(failed) == {"extract breastmnist@28 test_efficientnet",
                           "logreg breastmnist@28 test_efficientnet 1 seed 0"}
    assert failed["extract breastmnist@28 test_efficientnet"].startswith("StoreError")
    assert str(path) in failed["extract breastmnist@28 test_efficientnet"]
    assert "its extraction failed" in failed["logreg breastmnist@28 test_efficientnet 1 seed 0"]
    assert result.rows_added == 3  # test_resnet's logreg, both fine-tunes
    assert "FAILED extract breastmnist@28 test_efficientnet: StoreError" in result.summary()


def test_unknown_backbone_fails_the_plan_before_anything_runs(data_root, tmp_path):
    with pytest.raises(UnknownBackboneError, match="test_resnet"):
        run_grid(tiny(data_root, backbones=["test_resnet", "test_resnett"]), workdir=tmp_path,
                 progress=False)
    assert not (tmp_path / "stores").exists() or not list((tmp_path / "stores").glob("*.h5*"))


def test_an_executor_option_the_executor_does_not_take_is_one_line(data_root, tmp_path, capsys):
    spec = tmp_path / "grid.yaml"
    spec.write_text(f"datasets: [breastmnist]\nsizes: [28]\nbackbones: [test_resnet]\n"
                    f"weights: random\ndata_root: {data_root}\n")
    code = main(["grid", str(spec), "--gpus-per-job", "1", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "local executor does not take --gpus-per-job" in err and "ray, slurm" in err
    assert not (tmp_path / "stores").exists()  # refused before planning
    with pytest.raises(InvalidArgumentError, match="--max-workers"):
        run_grid(tiny(data_root), workdir=tmp_path, executor="slurm", max_workers=2)
    assert main(["grid", str(spec), "--executor", "slurm", "--timeout-min", "5", "--dry-run",
                 "--workdir", str(tmp_path)]) == 0


def test_grid_without_datasets_covers_every_file_present(synthetic_root, tmp_path):
    spec = spec_from_dict({**TINY, "datasets": None, "data_root": str(synthetic_root),
                           "methods": ["logreg"]})
    plan = plan_grid(spec, workdir=tmp_path)
    assert {j.request.dataset.name for j in plan.todo("extract")} == {
        "breastmnist", "bloodmnist", "chestmnist", "retinamnist", "organamnist"}
    assert len(plan.skipped) == 7 and "skipped pathmnist@28" in plan.describe()


def test_grid_preprocessing_reaches_finetunes_unless_overridden(data_root, tmp_path):
    grid = plan_grid(tiny(data_root, resize_policy="bilinear", input_size=40), workdir=tmp_path)
    (extract,) = grid.todo("extract")
    tunes = grid.todo("finetune")
    assert extract.request.preprocess.input_size == 40
    assert {j.request.preprocess.input_size for j in tunes} == {40}
    assert {j.request.key().resize_policy for j in tunes} == {"bilinear"}
    own = tiny(data_root, resize_policy="bilinear", input_size=40,
               finetune={"recipe": "medfm", "overrides": {"epochs": 1, "input_size": 48}})
    assert {j.request.preprocess.input_size for j in plan_grid(own, workdir=tmp_path)
            .todo("finetune")} == {48}


def test_report_from_a_grid(local_run):
    workdir, _ = local_run
    files = report(workdir=workdir, out=workdir / "grid-report")
    assert {p.name for p in files.plots} >= {"fraction_breastmnist_28.png",
                                              "probe_vs_finetune.png"}
    assert "test_resnet.r160_in1k · logreg" in files.markdown[0].read_text()


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="Ray is an optional extra (pip install 'medfm[dist]'), not installed")
def test_ray_cluster_matches_local(local_run, data_root, tmp_path):
    import ray

    workdir, _ = local_run
    try:
        result = run_grid(tiny(data_root), workdir=tmp_path, executor="ray", progress=False,
                          init_options={"num_cpus": 2, "include_dashboard": False})
    finally:
        ray.shutdown()
    assert result.ok, result.summary()
    assert results(tmp_path).equals(results(workdir))


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                    reason="submitit is an optional extra (pip install 'medfm[dist]'), "
                           "not installed")
def test_submitit_local_executor_matches_local(local_run, data_root, tmp_path):
    workdir, _ = local_run
    result = run_grid(tiny(data_root), workdir=tmp_path, executor="slurm", cluster="local",
                      gpus_per_job=0, cpus_per_job=1, timeout_min=5, poll_s=0.2,
                      progress=False)
    assert result.ok, result.summary()
    assert results(tmp_path).equals(results(workdir))
    assert (tmp_path / "slurm").is_dir()


def test_full_fraction_seeds_share_one_probe_fit(data_root, pool, tmp_path):
    spec = tiny(data_root, methods=["logreg"], seeds=[0, 1, 2])
    plan = plan_grid(spec, workdir=tmp_path)
    probes = [job for job in plan.jobs if job.kind == "probe"]
    assert [len(job.specs) for job in probes] == [1, 1, 1, 3]  # 0.5 x 3 seeds, then 1.0
    assert plan.total["probe"] == 6
    result = run_grid(spec, workdir=tmp_path, executor=pool, progress=False)
    assert result.ok and result.rows_added == 6
    full = sorted((r for r in Registry.in_workdir(tmp_path).query(method="logreg")
                   if r.key.fraction == 1.0), key=lambda r: r.key.seed)
    assert [r.key.seed for r in full] == [0, 1, 2]
    assert "shared_fit" not in full[0].extra  # fitted once, by the first seed
    assert all(r.extra["shared_fit"] == full[0].key.digest() for r in full[1:])
    assert len({(r.acc, r.auc, r.chosen_C) for r in full}) == 1
    halves = [r for r in Registry.in_workdir(tmp_path).query(method="logreg")
              if r.key.fraction == 0.5]
    assert len({r.subset_digest for r in halves}) == 3  # seeds draw different halves


def test_finetune_job_warnings_are_one_line_naming_the_job(data_root, tmp_path, capsys):
    plan = plan_grid(tiny(data_root, methods=["finetune"]), workdir=tmp_path)
    # fraction 0.5 of 32 images, batch 16 shrunk to 8 (medfm: at least 4 steps an epoch, at
    # least 8 images a batch), 1 epoch: 2 optimizer steps
    job = plan.jobs[0]
    rows = job.run()
    assert len(rows) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medfm grid: warning: {job.label}: 16 training images in batches of 8 make "
                   "2 optimizer step(s) per epoch, 2 in all: too few to learn much; raise "
                   "--epochs or lower --batch-size."]


@pytest.mark.parametrize("executor, options, flag", [
    ("slurm", {"cpus_per_job": 0}, "--cpus-per-job"),
    ("slurm", {"timeout_min": 0}, "--timeout-min"),
    ("slurm", {"gpus_per_job": -1}, "--gpus-per-job"),
    ("ray", {"cpus_per_job": 0.0}, "--cpus-per-job"),
    ("ray", {"gpus_per_job": float("nan")}, "--gpus-per-job"),
])
def test_executor_counts_that_cannot_work_are_one_line(executor, options, flag, tmp_path):
    """Zero CPUs, a zero time limit, negative or NaN GPUs: refused when the executor is made,
    through the API as on the command line (issue 10)."""
    from medfm.grid.executors import make_executor

    with pytest.raises(InvalidArgumentError, match=flag):
        make_executor(executor, workdir=tmp_path, **options)


def test_each_executor_types_its_own_flags(tmp_path, capsys):
    """--gpus-per-job is a fraction for Ray and a whole number for SLURM: one flag, typed by the
    executor chosen (it took Ray's float for every executor before)."""
    from medfm.grid.executors import typed_options

    assert typed_options("ray", {"gpus_per_job": "0.5"}) == {"gpus_per_job": 0.5}
    assert typed_options("slurm", {"gpus_per_job": "2"}) == {"gpus_per_job": 2}
    spec = tmp_path / "grid.yaml"
    spec.write_text("sizes: [28]\nbackbones: [test_resnet]\ndatasets: [breastmnist]\n")
    assert main(["grid", str(spec), "--executor", "slurm", "--gpus-per-job", "1.5",
                 "--dry-run", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--gpus-per-job '1.5': the slurm executor takes a whole number" in err
