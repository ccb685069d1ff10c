"""The throughput table (measured, shipped, FLOP-scaled figures) and a grid's cost estimate:
the dry run's estimate line, probe figures recorded by the driver, estimated vs actual after a
run. Accuracy of the estimate is benchmarks/estimate_bench.py's business (real data)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from medfm.cli import main
from medfm.extract import extract
from medfm.runtime import device_name
from medfm.synthetic import write_synthetic_npz
from medfm.throughput import (H200, SHIPPED, Measurement, forward_flops, lookup_throughput,
                              measured_figures, record_probe, record_throughput)

ESTIMATE_LINE = re.compile(r"^estimate extract \d+\.\d+ h  probe \d+\.\d+ h  finetune \d+\.\d+ h"
                           r"  total \d+\.\d+ h on cpu", re.M)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty $MEDFM_CACHE: no figure measured by another test."""
    monkeypatch.setenv("MEDFM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("throughput-data")
    write_synthetic_npz(root, "breastmnist", size=28, n=(32, 12, 16))
    write_synthetic_npz(root, "pneumoniamnist", size=28, n=(32, 12, 16))
    return root


def test_an_extraction_records_its_figure_and_lookup_prefers_it(cache, data_root, tmp_path):
    cpu = device_name(torch.device("cpu"))
    assert lookup_throughput("extract", "test_resnet", 32, cpu, "float32").kind != "measured"
    extract(dataset="breastmnist", size=28, backbone="test_resnet", weights="random",
            input_size=32, data_root=data_root, workdir=tmp_path, device="cpu", progress=False)
    figure = lookup_throughput("extract", "test_resnet", 32, cpu, "float32")
    assert figure.kind == "measured" and figure.rate > 0 and figure.overhead_s >= 0
    assert [f.key() for f in measured_figures()] == [figure.key()]
    # a compiled run without a compiled figure of its own is priced at the eager one
    compiled = lookup_throughput("extract", "test_resnet", 32, cpu, "float32", compiled=True)
    assert compiled.rate == figure.rate and compiled.source.endswith("eager")


def test_shipped_figures_then_flop_scaling_then_another_device_of_the_kind(cache):
    shipped = lookup_throughput("extract", "resnet50", 224, H200, "bfloat16")
    assert shipped.kind == "shipped" and shipped.rate == 8720.0
    scaled = lookup_throughput("extract", "convnext_base", 224, H200, "bfloat16")
    assert scaled.kind == "scaled"
    ref = next(f for f in SHIPPED if scaled.source.startswith(f"scaled from {f.arch}@224")
               and f.device == H200)
    flops_ref, flops = forward_flops(ref.arch, 224)[0], forward_flops("convnext_base", 224)[0]
    assert scaled.rate == pytest.approx(ref.rate * flops_ref / flops)
    assert forward_flops("resnet50", 224)[1] == 2048  # the feature width comes along
    other = lookup_throughput("extract", "resnet50", 224, "NVIDIA A100-SXM4-80GB", "bfloat16")
    assert "another device" in other.source and other.rate == pytest.approx(8720.0)
    assert lookup_throughput("extract", "resnet50", 224, "NVIDIA A100", "bfloat16",
                             measured=[]).device == "NVIDIA A100"


def test_probe_figures_are_the_line_through_the_recorded_jobs(cache):
    for units in (1e6, 4e6, 9e6):
        record_probe("logreg", "cpu (9 cores, test)", units, 2.0 + units / 1e6)
    figure = lookup_throughput("probe", "logreg", 0, "cpu (9 cores, test)", "float32")
    assert figure.kind == "measured"
    assert figure.rate == pytest.approx(1e6) and figure.overhead_s == pytest.approx(2.0)
    assert figure.seconds(5e6) == pytest.approx(7.0)


def test_grid_dry_run_prices_each_stage_and_a_run_reports_estimated_vs_actual(
        cache, data_root, tmp_path, capsys):
    def grid(dataset: str) -> list[str]:
        spec = tmp_path / f"{dataset}.yaml"
        spec.write_text(
            f"datasets: [{dataset}]\nsizes: [28]\nbackbones: [test_resnet]\nweights: random\n"
            "input_size: 32\nfractions: [1.0]\nseeds: [0]\nmethods: [logreg, finetune]\n"
            "device: cpu\nsolver: sklearn\n"
            "finetune: {recipe: medfm-v1, overrides: {epochs: 1, batch_size: 16}}\n"
            f"data_root: {data_root}\n")
        return ["grid", str(spec), "--workdir", str(tmp_path / "w"), "--quiet",
                "--max-workers", "1"]

    argv = grid("breastmnist")
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ESTIMATE_LINE.search(out)
    assert "extract figures:" in out and "measured" not in out.split("extract figures:")[1]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"estimated vs actual job hours: extract \d\.\d+ h vs \d\.\d+ h", out)
    assert "probe" in out.split("estimated vs actual")[1]
    # the report shows the same figures: one row per stage that ran (medfm.report.cost)
    shown = re.findall(r"(extract|probe|finetune) (\d\.\d+) h vs (\d\.\d+) h", out)
    assert main(["report", "--workdir", str(tmp_path / "w")]) == 0
    capsys.readouterr()
    page = (tmp_path / "w" / "report" / "report.md").read_text()
    assert "## Cost: estimated vs actual" in page
    for stage, est, got in shown:
        assert re.search(rf"\| {stage} \| 1 \| {est} \| {got} \|", page), (stage, page)
    # the run measured every stage on this machine: the next grid's figures rest on them
    assert main([*grid("pneumoniamnist"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ESTIMATE_LINE.search(out)
    for stage in ("extract", "probe", "finetune"):
        assert re.search(rf"{stage} figures: 1 measured\n", out), out


def test_measurements_of_a_configuration_combine_weighted_by_their_work(cache):
    """A small run (warm-up heavy, noisy) weighs less than a large one: the figure is total
    images over total seconds, the fixed seconds their median (one cold run does not set
    them)."""
    big = Measurement("extract", "resnet18", 64, "cpu (test)", "float32", False, 100.0, 2.0,
                      units=1000)
    record_throughput(big)
    record_throughput(replace(big, rate=10.0, overhead_s=4.0, units=10))
    figure = lookup_throughput("extract", "resnet18", 64, "cpu (test)", "float32")
    assert figure.rate == pytest.approx(1010 / (1000 / 100 + 10 / 10))
    assert figure.overhead_s == pytest.approx(3.0) and figure.source == "measured (2 runs)"
    record_throughput(replace(big, overhead_s=45.0))  # a cold start: the median holds
    figure = lookup_throughput("extract", "resnet18", 64, "cpu (test)", "float32")
    assert figure.overhead_s == pytest.approx(4.0) and figure.source == "measured (3 runs)"


def test_a_compiled_grid_has_the_same_jobs_and_keys_and_says_so(data_root, tmp_path):
    """`medfm grid --compile`: the same plan (keys, store names), its model jobs compiled."""
    from medfm.grid import plan_grid, spec_from_dict

    spec = spec_from_dict({"datasets": ["breastmnist"], "sizes": [28],
                           "backbones": ["test_resnet"], "weights": "random", "input_size": 32,
                           "fractions": [1.0], "seeds": [0], "methods": ["logreg", "finetune"],
                           "device": "cpu", "data_root": str(data_root)})
    eager, compiled = (plan_grid(spec, workdir=tmp_path, compile=c) for c in (False, True))
    assert [j.label for j in eager.jobs] == [j.label for j in compiled.jobs]
    model_jobs = [j for j in compiled.jobs if j.kind != "probe"]
    assert model_jobs and all(j.compile for j in model_jobs)
    assert not any(j.compile for j in eager.jobs if j.kind != "probe")
    assert ([j.request.filename() for j in eager.todo("extract")]
            == [j.request.filename() for j in compiled.todo("extract")])
    assert ([j.request.key().digest() for j in eager.todo("finetune")]
            == [j.request.key().digest() for j in compiled.todo("finetune")])
