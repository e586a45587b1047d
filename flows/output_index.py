"""After a sweep: its history record, a report snapshot, and the output folder's catalog and index page.

The sweep's own catalog and report (`<root>/catalog.duckdb`, `<root>/report/`) always show the spec
last run under that name; the snapshot `<root>/report-<sweep_id>/` and the record
`<root>/sweeps/<sweep_id>.json` keep each earlier spec's, and `<output_dir>/catalog.duckdb` and
`<output_dir>/index.html` list every sweep ever run in the folder (storage.history).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from reports.index_page import build_index_page
from storage.catalog import Manifest, connect
from storage.history import SweepRecord, now_text, write_record
from storage.layout import SweepLayout
from storage.output_catalog import build_output_catalog


def record_finished_sweep(record: SweepRecord, layout: SweepLayout, manifest: Manifest, failures: list[str],
                          report: str | None, best: list[dict[str, object]]) -> list[str]:
    """Write the sweep's record and snapshot, rebuild the output folder's catalog and index page; the
    problems (a full or read-only disk) come back as failure texts, never raised."""
    problems = []
    snapshot = None
    if report is not None:
        try:
            snapshot = snapshot_report(layout, record.sweep_id)
        except OSError as err:
            problems.append(f"report snapshot {layout.root / f'report-{record.sweep_id}'}: {err}")
    finished = replace(record, status="failed" if failures or problems else "completed", finished_at=now_text(),
                       run_ids=manifest.run_ids, render_ids=manifest.render_ids, run_roots=manifest.run_roots,
                       render_roots=manifest.render_roots, zero_weight_in_grid=manifest.zero_weight_in_grid,
                       images=image_count(layout), best=tuple(best), failures=tuple(failures),
                       report=snapshot and str(Path(snapshot).relative_to(layout.root)))
    output_dir = layout.root.parent
    steps = (("sweep record", lambda: write_record(finished)),
             (f"output catalog {output_dir / 'catalog.duckdb'}", lambda: build_output_catalog(output_dir)),
             (f"index page {output_dir / 'index.html'}", lambda: build_index_page(output_dir)))
    for what, step in steps:
        try:
            step()
        except OSError as err:
            problems.append(f"{what}: {err}")
    return problems


def snapshot_report(layout: SweepLayout, sweep_id: str) -> Path:
    """Copy the report folder to `report-<sweep_id>/` beside it (same depth, so its links still work)."""
    target = layout.root / f"report-{sweep_id}"
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=layout.root))
    try:
        shutil.copytree(layout.report_dir, staging, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / "index.html"


def image_count(layout: SweepLayout) -> int:
    try:
        with connect(layout) as con:
            return int(con.execute("SELECT count(*) FROM images").fetchone()[0])
    except Exception:  # noqa: BLE001 - a count for the index page; the catalog's own failure is reported already
        return 0
