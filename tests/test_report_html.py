"""report.html without a browser: variant labels, the page's embedded data, and what a large
registry leaves to the files (tests/test_report_browser.py opens the page in Chromium).

Run: .venv/bin/python -m pytest tests/test_report_html.py -q
"""

from __future__ import annotations

import itertools
import json
import re

import pandas as pd
import pytest

from medfm.report import html as page_module
from medfm.report import report
from medfm.report.labels import BACKBONE_CHARS, short_backbones, variant_labels
from medfm.report.tables import annotate
from medfm.store.registry import Registry

from .test_report import SEEDS, add_run

CLIP = ("vit_base_patch16_clip_224.laion2b_ft_in12k_in1k",
        "vit_base_patch16_clip_224.openai_ft_in12k_in1k")  # alike for 27 characters


def _scripts(page: str) -> list[str]:
    return re.findall(r"<script\b[^>]*>(.*?)</script>", page, flags=re.S)


def _data(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="medfm-data">(.*?)</script>', page,
                      flags=re.S)
    return json.loads(found.group(1))


def test_short_backbones_are_unique_prefixes():
    short = short_backbones([*CLIP, "resnet18.a1_in1k"])
    assert short["resnet18.a1_in1k"] == "resnet18.a1_in1k"  # short names stay whole
    assert short[CLIP[0]] == "vit_base_patch16_clip_224.l…"
    assert short[CLIP[1]] == "vit_base_patch16_clip_224.o…"
    assert all(len(s) <= BACKBONE_CHARS for s in short.values())


def test_labels_are_short_unique_and_carry_full_settings(tmp_path):
    registry = Registry.in_workdir(tmp_path / "work")
    for backbone, policy, seed in itertools.product(CLIP, ("bilinear", "pad"), SEEDS):
        add_run(registry, backbone=backbone, method="logreg", size=28, dataset="breastmnist",
                fraction=1.0, seed=seed, resize_policy=policy, acc=0.8)
    labels = variant_labels(annotate(registry.to_dataframe()))
    assert len(labels) == 4 and len({v.label for v in labels.values()}) == 4
    full = f"{CLIP[0]} · logreg resize_policy=pad"
    assert labels[full].label == "vit_base_patch16_clip_224.l… · logreg resize=pad"
    settings = dict(line.split(": ", 1) for line in labels[full].settings.splitlines())
    assert settings["backbone"] == CLIP[0] and settings["resize_policy"] == "pad"
    assert settings["params"] == '{"C_grid": [0.1, 1.0]}' and settings["paradigm"] == (
        "linear probe")


def test_page_data_is_the_summary_and_cannot_close_its_script(tmp_path):
    registry = Registry.in_workdir(tmp_path / "work")
    for tag, seed in itertools.product(("</script><b>x", "plain"), SEEDS):
        add_run(registry, backbone="resnet_a", method="logreg", size=28, dataset="breastmnist",
                fraction=1.0, seed=seed, params={"C_grid": [1.0], "tag": tag},
                acc=0.7 + seed / 100)
    files = report(workdir=tmp_path / "work")
    page = files.html.read_text()
    assert len(_scripts(page)) == page.count("</script>") == 4  # data, config, plotly, own
    data = _data(page)
    summary = pd.read_csv(files.out / "tables" / "summary.csv")
    assert len(data["rows"]) == len(summary) == 2
    rows = {data["variants"][r[data["columns"].index("variant")]]["variant"]:
            dict(zip(data["columns"], r, strict=True)) for r in data["rows"]}
    for record in summary.to_dict("records"):
        assert rows[record["variant"]]["acc_mean"] == pytest.approx(record["acc_mean"], abs=1e-5)
        assert rows[record["variant"]]["acc_std"] == pytest.approx(record["acc_std"], abs=1e-5)
    assert any("</script><b>x" in v["settings"] for v in data["variants"])


def test_large_tables_and_figures_are_left_to_their_files(tmp_path, monkeypatch):
    registry = Registry.in_workdir(tmp_path / "work")
    for (backbone, method), fraction, seed in itertools.product(
            (("resnet_a", "logreg"), ("resnet_a", "finetune")), (0.1, 1.0), SEEDS):
        add_run(registry, backbone=backbone, method=method, size=28, dataset="breastmnist",
                fraction=fraction, seed=seed, acc=0.7 + fraction / 10)
    monkeypatch.setattr(page_module, "STATIC_CELLS", 5)
    kept = tmp_path / "work" / "report" / "plots" / "probe_vs_finetune.png"
    files = report(workdir=tmp_path / "work")
    monkeypatch.setattr(page_module, "INLINE_PNG_BYTES", kept.stat().st_size)
    files = report(workdir=tmp_path / "work")
    page = files.html.read_text()
    assert 'id="table-per_dataset_acc"' not in page
    assert "too large for the page; see tables/per_dataset_acc.md" in page
    assert "| breastmnist | 28 | 10% |" in (files.out / "tables/per_dataset_acc.md").read_text()
    # the probe-vs-fine-tune plot has no interactive twin: it is the one inlined
    assert re.findall(r'<img alt="([^"]+)"', page) == ["probe_vs_finetune"]
    assert "fraction_breastmnist_28.png" in page and len(files.plots) == 2
