"""report.html in a real headless Chromium: it opens offline with no console error and no
network request, fits a 1280 px window, and its filters, sorting and plots work.

Run: .venv/bin/python -m pytest tests/test_report_browser.py -q

Needs Playwright (the `browser` extra, in `dev`) and a system Chromium (Debian `chromium`,
installed by .ci/run); skips with the reason where either is missing. The work directory holds
real probes (logistic regression and kNN on real BreastMNIST-28 features of timm's tiny
`test_resnet`) beside the synthetic rows of test_report (two backbones, two datasets, two
sizes, a fine-tune), so every filter has something to hide.
"""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from medfm.errors import MedfmError
from medfm.extract import extract
from medfm.probe import probe
from medfm.report import report
from medfm.report.browser import settle
from medfm.store.registry import Registry

from .test_report import BASES, DATASETS, FRACTIONS, SEEDS, add_run

WIDTH = 1280


def _browser_or_skip() -> None:
    from medfm.report.browser import chromium_executable

    try:
        import playwright  # noqa: F401

        chromium_executable()
    except (ImportError, MedfmError) as exc:
        pytest.skip(f"no browser to test report.html in: {exc}")


@pytest.fixture(scope="module")
def page_files(real_root, tmp_path_factory):
    _browser_or_skip()
    workdir = tmp_path_factory.mktemp("browser") / "work"
    extract(dataset="breastmnist", size=28, backbone="test_resnet", weights="random",
            resize_policy="native", data_root=real_root, workdir=workdir, progress=False)
    for method in ("logreg", "knn"):
        probe(dataset="breastmnist", fractions=[0.1, 1.0], seeds=[0, 1], method=method,
              workdir=workdir, progress=False)
    registry = Registry.in_workdir(workdir)
    for (backbone, method, size), dataset, fraction, seed in itertools.product(
            BASES, DATASETS, FRACTIONS, SEEDS):
        add_run(registry, backbone=backbone, method=method, size=size, dataset=dataset,
                fraction=fraction, seed=seed)
    return report(workdir=workdir)


@pytest.fixture
def opened(page_files):
    from medfm.report.browser import open_page

    with open_page(page_files.html, window=(WIDTH, 900)) as (page, log):
        yield page, log
    assert not log.errors, f"console errors: {log.errors}"
    assert log.requests == [page_files.html.resolve().as_uri()]  # the file itself, nothing else


def _column(page, table: str, title: str) -> list[str]:
    """The visible cells of `title`'s column in `table` (an id), top to bottom."""
    return page.evaluate("""([table, title]) => {
        const t = document.getElementById(table);
        const i = Array.from(t.tHead.rows[0].cells).findIndex((th) => th.textContent.trim()
                                                              .replace(/ [▲▼]$/, "") === title);
        return Array.from(t.tBodies[0].rows).filter((tr) => !tr.hidden)
            .map((tr) => tr.cells[i].textContent.trim());
    }""", [table, title])


def _untick(page, field: str, value: str) -> None:
    page.locator(f'fieldset[data-field="{field}"] input[value="{value}"]').uncheck()
    settle(page)  # the redraw runs on the next animation frame


def _mean(cell: str) -> float:
    return float(cell.split(" ± ")[0])


def test_opens_offline_fits_1280_px_and_draws_plots(opened, page_files):
    page, log = opened
    summary = pd.read_csv(page_files.out / "tables" / "summary.csv")
    assert page.evaluate("document.documentElement.scrollWidth") <= WIDTH  # nothing runs off
    right = page.evaluate("""Math.max(...Array.from(document.querySelectorAll('body *'))
        .filter((e) => e.offsetParent !== null && !e.closest('.scroll, .plot'))
        .map((e) => e.getBoundingClientRect().right))""")
    assert right <= WIDTH
    guideline = page.locator("#guideline .scroll").bounding_box()
    assert guideline["x"] + guideline["width"] <= WIDTH  # the guideline table scrolls in its box
    assert page.locator("#count").inner_text() == (
        f"{len(summary)} of {len(summary)} rows (condition × variant) shown")
    # the first plot: one trace per variant run at that dataset and size (Plotly drew it)
    cell = page.locator("#plot-cell").input_value()
    dataset, size = cell.removesuffix(" px").split(" @ ")
    expected = summary[(summary["dataset"] == dataset) & (summary["size"] == int(size))
                       & summary["fraction"].notna()]["variant"].nunique()
    assert page.locator("#plot-fraction .scatterlayer .trace").count() == expected > 1
    assert page.locator("#plot-size .scatterlayer .trace").count() > 1  # breastmnist at 28 and 64


def test_filters_hide_rows_columns_and_recompute_the_mean(opened, page_files):
    page, _ = opened
    summary = pd.read_csv(page_files.out / "tables" / "summary.csv")
    _untick(page, "dataset", "pneumoniamnist")
    assert set(_column(page, "results-table", "dataset")) == {"breastmnist"}
    kept = (summary["dataset"] == "breastmnist").sum()
    assert page.locator("#count").inner_text().startswith(f"{kept} of {len(summary)} rows")
    assert set(_column(page, "table-per_dataset_acc", "dataset")) == {"breastmnist"}
    assert "pneumoniamnist" not in page.locator("#plot-cell").inner_text()
    # paradigm: only kNN left; the static tables hide every other variant's column
    for paradigm in set(summary["paradigm"]) - {"kNN"}:
        _untick(page, "paradigm", paradigm)
    assert set(_column(page, "results-table", "paradigm")) == {"kNN"}
    visible = page.evaluate("""Array.from(document.querySelectorAll(
        '#table-per_dataset_acc th[data-variant]')).filter((th) => !th.hidden).length""")
    assert visible == summary[summary["paradigm"] == "kNN"]["variant"].nunique() == 1
    # show everything again, then one size: the mean over datasets is the report's own CSV
    page.locator("#reset").click()
    settle(page)
    _untick(page, "size", "64")
    means = pd.read_csv(page_files.out / "tables" / "mean_over_datasets.csv")
    means = means[means["size"] == 28]
    shown = _column(page, "means-table", "AUC (%)")
    assert len(shown) == len(means)
    assert sorted(float(c) for c in shown) == pytest.approx(
        sorted(round(v * 100, 1) for v in means["auc_mean"]))


def test_headers_sort_and_variants_show_their_settings(opened, page_files):
    page, _ = opened
    header = page.locator("#results-table th", has_text="AUC (%)")
    header.click()  # a metric sorts best first
    first = [_mean(c) for c in _column(page, "results-table", "AUC (%)")]
    assert first == sorted(first, reverse=True)
    assert header.get_attribute("aria-sort") == "descending"
    page.locator("#results-table th", has_text="AUC (%)").click()
    again = [_mean(c) for c in _column(page, "results-table", "AUC (%)")]
    assert again == sorted(again)
    summary = pd.read_csv(page_files.out / "tables" / "summary.csv")
    assert again[0] == round(summary["auc_mean"].min() * 100, 1)
    # a static table sorts on a header click too (missing values last)
    page.locator("#table-per_dataset_auc th", has_text="resnet_a · logreg").click()
    cells = [_mean(c) for c in _column(page, "table-per_dataset_auc", "resnet_a · logreg")
             if c != "—"]
    assert cells == sorted(cells)
    # the real probe's variant: a short label, every key field on hover
    hover = page.locator('#results-table .variant', has_text="test_resnet").first
    assert hover.inner_text() in {"test_resnet.r160_in1k · logreg", "test_resnet.r160_in1k · knn"}
    settings = hover.get_attribute("title")
    assert "resize_policy: native" in settings and "weights: random" in settings


def test_filters_that_leave_nothing_say_so(opened):
    page, _ = opened
    page.locator('fieldset[data-field="dataset"] button.none').click()
    settle(page)
    assert page.locator("#results-pager").inner_text() == "Nothing matches the filters."
    assert page.locator("#plot-fraction .empty").inner_text() == (
        "Nothing to plot for the selected filters.")


def test_filters_live_in_the_address_and_metrics_show_their_ci(opened, page_files):
    page, _ = opened
    _untick(page, "dataset", "pneumoniamnist")
    _untick(page, "size", "64")
    assert page.url.endswith("#dataset=breastmnist&size=28")
    fresh = page.context.browser.new_page()  # the address alone restores the view
    errors = []
    fresh.on("pageerror", lambda exc: errors.append(str(exc)))
    fresh.goto(page.url)
    settle(fresh)
    assert set(_column(fresh, "results-table", "dataset")) == {"breastmnist"}
    assert set(_column(fresh, "results-table", "size")) == {"28"}
    assert not fresh.locator('fieldset[data-field="size"] input[value="64"]').is_checked()
    assert not errors
    fresh.close()
    # an ACC cell's hover holds the seed mean of its bootstrap interval, as summary.csv
    summary = pd.read_csv(page_files.out / "tables" / "summary.csv")
    row = summary[(summary["dataset"] == "breastmnist") & (summary["size"] == 28)].iloc[0]
    page.locator("#results-table th", has_text="dataset").click()  # any order: find the row
    cells = page.locator("#results-table tbody tr").filter(
        has_text=row["regime"]).filter(has=page.locator(".variant", has_text=row["variant"]))
    title = cells.first.locator("td").nth(6).get_attribute("title")
    assert title == (f"95% CI, seed mean of bootstrap bounds: {row['acc_ci_low'] * 100:.1f}–"
                     f"{row['acc_ci_high'] * 100:.1f}")
