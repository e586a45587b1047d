"""The report of a sweep too big for one page: image rows in slice files read on demand, pages of at most
MAX_THUMBS images, cheap rebuilds. A synthetic sweep from bench/report_scale.py, with small slices so a
small sweep already spans many of them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.report_scale import make_synthetic_sweep
from reports.build_report import build_report
from tests.browser import (
    CDPSession,
    broken_images,
    open_file,
    page_session,
    wait_for,
    wait_grid,
)

SLICE_ROWS = 200
MAX_THUMBS = 400  # report.js
GRID_IMAGES = "document.querySelectorAll('#grids img').length"
READ_SLICES = "window.loraSweepReport.read().filter(key => key.startsWith('grid:'))"
ALL_FILTERS_JS = """(() => { document.querySelectorAll('.filters select').forEach(s => { s.value = '*'; });
  const per = document.getElementById('per-cell'); per.value = '64';
  per.dispatchEvent(new Event('change', {bubbles: true})); })()"""


@pytest.fixture(scope="module")
def big_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("scale") / "sweep"
    return root, make_synthetic_sweep(root, 1500)


@pytest.fixture()
def page() -> Iterator[CDPSession]:
    yield from page_session()


def report_data(index: Path) -> dict:
    text = index.read_text(encoding="utf-8")
    return json.loads(re.search(r'id="report-data">(.*?)</script>', text, re.DOTALL).group(1))


def test_index_holds_no_image_rows_and_rebuilds_rewrite_nothing(big_sweep: tuple[Path, int],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root, images = big_sweep
    monkeypatch.setattr("reports.slices.GRID_ROWS", SLICE_ROWS)
    index = build_report(root)
    data = report_data(index)
    assert len(data["grid"]) == -(-images // SLICE_ROWS) and sum(s["n"] for s in data["grid"]) == images
    text = index.read_text(encoding="utf-8")
    some_image = next((root / "images" / "render-baseline0").iterdir()).name
    assert some_image not in text and "render-baseline0" not in text  # rows live in data/, not in the page
    files = {p.name: p.stat().st_mtime_ns for p in (root / "report" / "data").iterdir()}
    assert build_report(root, progress="in progress: 3 of 8 runs, 120 of 400 images") == index
    assert {p.name: p.stat().st_mtime_ns for p in (root / "report" / "data").iterdir()} == files  # none rewritten
    assert "Sweep under way:</b> in progress: 3 of 8 runs, 120 of 400 images" in index.read_text(encoding="utf-8")
    monkeypatch.setattr("reports.slices.GRID_ROWS", SLICE_ROWS * 2)
    build_report(root)
    data = report_data(index)
    listed = {Path(s["file"]).name for s in data["grid"]} | {Path(f).name for f in data["details"]}
    assert {p.name for p in (root / "report" / "data").iterdir()} == listed  # the old slices are gone


@pytest.mark.timeout(90)
def test_big_report_reads_only_what_it_shows_and_pages_all_filters(big_sweep: tuple[Path, int], page: CDPSession,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root, images = big_sweep
    monkeypatch.setattr("reports.slices.GRID_ROWS", SLICE_ROWS)
    index = build_report(root)
    slices = len(report_data(index)["grid"])
    open_file(page, index)
    wait_grid(page)
    # Default view: rank x checkpoint step at one LoRA weight (so no baseline), both learning rates (a training
    # option starts on "all"): 4 ranks x 4 steps x 2 images, read from a few of the slices.
    assert page.evaluate(GRID_IMAGES) == 4 * 4 * 2
    assert broken_images(page) == []
    assert 0 < len(page.evaluate(READ_SLICES)) < slices
    page.evaluate(ALL_FILTERS_JS)
    wait_grid(page)
    assert len(set(page.evaluate(READ_SLICES))) == slices  # every image may show: every slice read
    assert 0 < page.evaluate(GRID_IMAGES) <= MAX_THUMBS
    assert page.evaluate("document.getElementById('pager').hidden") is False
    first = page.evaluate("document.getElementById('page-status').textContent")
    seen = set(page.evaluate("Array.from(document.querySelectorAll('#grids img')).map(i => i.src)"))
    page.evaluate("document.getElementById('page-next').click()")
    assert page.evaluate("document.getElementById('page-status').textContent") != first
    later = set(page.evaluate("Array.from(document.querySelectorAll('#grids img')).map(i => i.src)"))
    assert later and not later & seen and page.evaluate(GRID_IMAGES) <= MAX_THUMBS
    assert broken_images(page) == []
    page.evaluate("Array.from(document.querySelectorAll('#grids a.thumb')).pop().click()")
    assert wait_for(page, "document.getElementById('viewer').dataset.state === 'ready'")
    assert "clip_score" in page.evaluate("document.getElementById('viewer-metrics').innerText")
    assert page.console_errors() == []
