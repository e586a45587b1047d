"""Watching a sweep: checkpoints render while training goes on, and the report shows progress mid-sweep."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import duckdb
import pytest

from tests.browser import BrowserUnavailable, Chromium, open_file
from tests.conftest import small_sweep_data, write_spec

pytestmark = pytest.mark.slow  # whole flows (three sweeps; a live one): 50-90 s each


@pytest.fixture(scope="module")
def live_sweep(prefect_harness, tmp_path_factory: pytest.TempPathFactory):
    """Three runs on the thread runner's two slots, a live rebuild after every finished task, and a watcher
    that opens the report in Chromium the first time it says "in progress" with images on disk."""
    import flows.live
    from flows.lora_sweep import lora_sweep

    tmp = tmp_path_factory.mktemp("live")
    data = small_sweep_data(tmp / "out", ranks=[2, 3, 4], max_steps=4, checkpoint_steps=[2, 4], batch_size=1)
    data["render"].update(seeds=[1], samplers=["Euler a"], steps=[2])
    spec_path = write_spec(tmp, data)
    report = tmp / "out" / "small" / "report" / "index.html"
    seen: dict[str, object] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if report.is_file() and "in progress:" in report.read_text(errors="replace"):
                seen.update(_look(report))
                if seen.get("images"):
                    return
            time.sleep(0.2)

    interval, flows.live.LIVE_INTERVAL_S = flows.live.LIVE_INTERVAL_S, 0.0  # rebuild after every finished task
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = lora_sweep(spec_path=str(spec_path))
    finally:
        stop.set()
        watcher.join(timeout=60)
        flows.live.LIVE_INTERVAL_S = interval
    return summary, seen, report


def _look(report: Path) -> dict[str, object]:
    """What Chromium shows of the report now: the progress line and how many images loaded."""
    try:
        with Chromium() as page:
            open_file(page, report)
            deadline = time.monotonic() + 15
            while True:
                loaded = page.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length")
                if loaded or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            text = page.evaluate("document.body.innerText")
    except BrowserUnavailable as err:
        return {"skip": str(err)}
    line = next((ln for ln in text.splitlines() if "in progress:" in ln), None)
    return {"progress": line, "images": loaded}


def test_a_checkpoints_images_exist_before_the_last_training_run_finishes(live_sweep) -> None:
    summary, _, _ = live_sweep
    root = Path(summary["sweep_root"])
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        last_finish = con.execute("SELECT max(finished_at) FROM runs").fetchone()[0]
        paths = [r[0] for r in con.execute("SELECT path FROM images WHERE checkpoint_id IS NOT NULL").fetchall()]
    first_image = min(Path(p).stat().st_mtime for p in paths)
    assert first_image < last_finish.timestamp(), "every checkpoint rendered only after all training ended"


def test_the_mid_sweep_report_shows_progress_and_rendered_images(live_sweep) -> None:
    _, seen, report = live_sweep
    if "skip" in seen:
        pytest.skip(str(seen["skip"]))
    assert seen.get("images"), f"no image loaded in a mid-sweep report: {seen}"
    assert seen["progress"] and " of 3 runs" in seen["progress"] and " images" in seen["progress"]
    assert "in progress:" not in report.read_text()  # the finished sweep's report has no progress line


def test_the_finished_sweep_lists_every_run_and_image(live_sweep) -> None:
    summary, _, _ = live_sweep
    with duckdb.connect(str(Path(summary["sweep_root"]) / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs WHERE status = 'completed'").fetchone()[0] == 3
        # baseline 1 image + 3 runs x 2 checkpoints x 1 LoRA weight
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 1 + 3 * 2
