"""Train a run as a flow run of a training deployment, so any worker of its pool can take it.

The parent sweep waits for the flow run, then reads the run's checkpoints from the shared
output folder. The worker that trains writes everything there, so `output_dir` must be one
folder mounted at the same path on every worker (see docs/scaling.md).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current

from storage.layout import SweepLayout
from tasks.sweep.plan import TrainingRunSpec
from tasks.train.child_process import TrainingFailed
from tasks.train.records import already_done, completed, recorded_error, write_run_row

POLL_INTERVAL_S = 2.0


def train_via_deployment(run: TrainingRunSpec, deployment: str):
    """Run `deployment` with this run and wait; raise TrainingFailed unless its checkpoints exist after."""
    started = datetime.now(timezone.utc)
    # The key makes a retried task find its flow run again instead of submitting a second one; an adaptive
    # sweep's later rung (stop_at) is a new flow run of the same training run.
    stop = f"@{run.stop_at}" if run.stop_at is not None else ""
    child = run_deployment(deployment, parameters={"run": run.model_dump(mode="json")}, timeout=None,
                           poll_interval=POLL_INTERVAL_S, idempotency_key=f"{current.id}:{run.run_id}{stop}",
                           flow_run_name=f"train-{run.run_id}{stop}", tags=["lora-sweep", "train-run"])
    layout = SweepLayout(Path(run.sweep_root))
    state = child.state
    if state is not None and state.is_completed():
        if already_done(run, layout):
            return completed(run, layout)
        error = (f"flow run {child.name} of {deployment} completed but run {run.run_id}'s checkpoints are not in "
                 f"{run.sweep_root}; is output_dir one shared folder mounted at the same path on every worker?")
    else:
        error = recorded_error(layout, run) or (f"flow run {child.name} of {deployment} ended "
                                                 f"{state.name if state else 'without a state'}: "
                                                 f"{state.message if state else ''}")
    if recorded_error(layout, run) is None:
        write_run_row(run, layout, started, status="failed", error=error, stats={})
    raise TrainingFailed(f"run {run.run_id}: {error}")
