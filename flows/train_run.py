"""The `lora-train` flow: one training run of a sweep, as its own flow run on any worker.

A sweep whose spec sets `[execution] train_deployment = "lora-train/train-run"` submits each of
its training runs here; every worker of the deployment's pool (one per GPU machine, or per GPU
with CUDA_VISIBLE_DEVICES) takes some. The run's claim in the shared output folder keeps a run
from training twice, and finished checkpoints are skipped, as in the sweep itself.
"""

from __future__ import annotations

from prefect import flow

from tasks.prefect_tasks import train_task
from tasks.sweep.plan import TrainingRunSpec


@flow(name="lora-train", flow_run_name="train-{run.run_id}", log_prints=True)
def train_run(run: TrainingRunSpec) -> dict[str, object]:
    """Train `run` (ids and paths only; everything lands under its sweep_root) and list its checkpoints."""
    result = train_task(run)
    return {"run_id": result.run_id, "status": result.status,
            "checkpoints": [c.lora_dir for c in result.checkpoints]}
