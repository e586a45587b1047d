"""Watch a sweep while it runs: the catalog and report rebuilt as work lands, and a Prefect progress artifact.

After a task ends (at most every LIVE_INTERVAL_S seconds) the sweep's manifest lists every planned
run and the render jobs finished so far, the catalog is rebuilt from it and the report is rebuilt
with an "in progress: N of M runs, K of L images" line; the flow run's progress artifact moves with
it. The finished sweep's last build (flows/lora_sweep.finish_sweep) carries no progress line, so its
report is the one a sweep without live updates makes. A live build that fails (a full disk) is
logged and skipped: the sweep goes on, and the final build reports the problem.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.pipeline import PipelineState
from reports.build_report import build_report
from storage.catalog import Manifest, build_catalog
from storage.layout import SweepLayout

LIVE_INTERVAL_S = float(os.environ.get("LORA_SWEEP_LIVE_INTERVAL_S", "10"))  # 0: after every finished task
log = logging.getLogger(__name__)


@dataclass
class LiveProgress:
    """Callback for run_pipeline: throttled live catalog + report builds and the progress artifact."""

    layout: SweepLayout
    manifest: Manifest  # the final manifest's shape: every run; render ids are filled in as jobs finish
    interval_s: float | None = None  # None: LIVE_INTERVAL_S, read at each call
    last_build: float = field(default=0.0)
    artifact_id: object | None = None
    builds: int = 0

    def start(self) -> None:
        try:
            self.artifact_id = create_progress_artifact(progress=0.0, key="lora-sweep-progress",
                                                        description="images rendered of the planned grid")
        except Exception as err:  # noqa: BLE001 - outside a flow run (a plain call) there is no artifact
            log.debug("no progress artifact: %s", err)

    def __call__(self, state: PipelineState) -> None:
        self._artifact(state)
        interval = LIVE_INTERVAL_S if self.interval_s is None else self.interval_s
        if self.builds and time.monotonic() - self.last_build < interval:
            return
        self.last_build = time.monotonic()
        done = [j.render_id for j in state.submitted_jobs() if j.render_id in state.finished
                and state.render_futures[j.render_id].state.is_completed()]
        manifest = Manifest(self.manifest.sweep_id, self.manifest.run_ids, tuple(done),
                            self.manifest.zero_weight_in_grid, self.manifest.run_roots,
                            {k: v for k, v in self.manifest.render_roots.items() if k in done})
        text = progress_text(state)
        try:
            manifest.write(self.layout)
            build_catalog(self.layout, manifest)
            build_report(self.layout.root, progress=text)
            self.builds += 1
        except Exception as err:  # noqa: BLE001 - a live view must never stop the sweep
            log.warning("live report not updated (%s): %s", text, err)

    def _artifact(self, state: PipelineState) -> None:
        if self.artifact_id is None:
            return
        planned = state.images_planned or 1
        try:
            update_progress_artifact(self.artifact_id, progress=round(100.0 * state.images_done / planned, 1),
                                     description=progress_text(state))
        except Exception as err:  # noqa: BLE001
            log.debug("progress artifact not updated: %s", err)


def progress_text(state: PipelineState) -> str:
    return (f"in progress: {state.runs_done} of {len(state.runs)} runs, "
            f"{state.images_done} of {state.images_planned} images")
