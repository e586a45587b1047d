"""What became of each render job, written by the flow as `renders` rows (storage/schema.py).

A failed render is data, as a failed training run is: the flow records every job's outcome from
its future, so an exception in the task, a killed worker and a task that never started are all
recorded, and the report lists the failed jobs. A job's row is replaced atomically when a later
flow run of the sweep ends it differently (a job that later succeeds is no longer listed as
failed) and left alone otherwise, so re-running a finished sweep rewrites no file.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
from prefect.futures import PrefectFuture

from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from tasks.sweep.cells import grid_cells
from tasks.sweep.plan import RenderJobSpec


def outcome_row(job: RenderJobSpec, future: PrefectFuture, recorded_at: datetime) -> dict[str, object]:
    """The job's `renders` row from its finished future."""
    state = future.state
    ckpt = job.checkpoint
    return {"sweep_id": job.sweep_id, "render_id": job.render_id, "base_model": job.base_model.name,
            "run_id": ckpt.run_id if ckpt else None, "checkpoint_id": ckpt.checkpoint_id if ckpt else None,
            "checkpoint_step": ckpt.step if ckpt else None,
            "status": "completed" if state.is_completed() else "failed",
            "error": None if state.is_completed() else (state.message or f"ended {state.type.value}"),
            "planned_images": len(grid_cells(job)), "recorded_at": recorded_at}


def record_render_outcomes(layout: SweepLayout, jobs: Sequence[RenderJobSpec],
                           futures: Sequence[PrefectFuture]) -> list[str]:
    """Write one `renders` file per job (`tables/renders/<render_id>.parquet`); call after waiting.

    A file that cannot be written (a full disk, a folder that refuses writes) does not stop the
    sweep's catalog and report: it comes back as a failure message for the flow's final state.
    """
    recorded_at = datetime.now(timezone.utc)
    failures = []
    for job, future in zip(jobs, futures, strict=True):
        path = layout.table_file("renders", job.render_id)
        row = outcome_row(job, future, recorded_at)
        try:
            if not same_outcome_recorded(path, row):
                write_rows("renders", [row], path)
        except OSError as err:
            failures.append(f"render {job.render_id}: its outcome could not be written to {path}: {err}")
    return failures


def same_outcome_recorded(path: Path, row: dict[str, object]) -> bool:
    """True when `path` already records the row's status and error (its earlier time is kept)."""
    if not path.exists():
        return False
    recorded = pq.read_table(path, columns=["status", "error"]).to_pylist()
    return recorded == [{"status": row["status"], "error": row["error"]}]
