"""A training run's records on disk: its `runs` and `checkpoints` rows, whether it finished, its checkpoints.

No torch: the subprocess and deployment runners read a run's status here without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.parquet as pq

from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from tasks.lora.files import DIFFUSERS_FILE, checkpoint_complete
from tasks.sweep.ids import checkpoint_id
from tasks.sweep.plan import CheckpointRef, TrainingRunSpec
from tasks.sweep.presets import target_preset_of


@dataclass(frozen=True)
class TrainingResult:
    """What the flow needs to schedule renders: the run id, status and its checkpoints."""

    run_id: str
    status: str
    checkpoints: tuple[CheckpointRef, ...]
    error: str | None = None


def already_done(run: TrainingRunSpec, layout: SweepLayout) -> bool:
    """The run's row says completed and every checkpoint folder is complete."""
    row_file = layout.table_file("runs", run.run_id)
    if not row_file.exists():
        return False
    status = pq.read_table(row_file, columns=["status"]).column("status").to_pylist()
    return status == ["completed"] and all(
        checkpoint_complete(layout.checkpoint_dir(run.run_id, s)) for s in run.checkpoint_steps
    )


def completed(run: TrainingRunSpec, layout: SweepLayout) -> TrainingResult:
    """The result of a finished run, read from its folders."""
    return TrainingResult(run.run_id, "completed", checkpoint_refs(run, layout))


def checkpoint_refs(run: TrainingRunSpec, layout: SweepLayout) -> tuple[CheckpointRef, ...]:
    return tuple(
        CheckpointRef(run_id=run.run_id, checkpoint_id=checkpoint_id(run.run_id, s), step=s, rank=run.rank,
                      lora_dir=str(layout.checkpoint_dir(run.run_id, s)))
        for s in run.checkpoint_steps
    )


def recorded_error(layout: SweepLayout, run: TrainingRunSpec) -> str | None:
    """The error of the run's failed row, if it has one."""
    path = layout.table_file("runs", run.run_id)
    if not path.exists():
        return None
    rows = pq.read_table(path, columns=["status", "error"]).to_pylist()
    return rows[0]["error"] if rows and rows[0]["status"] == "failed" else None


def checkpoint_row(run: TrainingRunSpec, layout: SweepLayout, step: int, losses: list[float],
                   elapsed: float) -> dict[str, object]:
    """A `checkpoints` row (validation_loss is filled in by the caller)."""
    ckpt_id = checkpoint_id(run.run_id, step)
    folder = layout.checkpoint_dir(run.run_id, step)
    recent = losses[-20:]
    return {
        "sweep_id": run.sweep_id, "run_id": run.run_id, "checkpoint_id": ckpt_id, "step": step,
        "lora_path": str(folder / DIFFUSERS_FILE), "kohya_path": str(folder / f"{ckpt_id}.safetensors"),
        "train_loss_smoothed": sum(recent) / len(recent), "wall_time_s": elapsed,
    }


def write_run_row(run: TrainingRunSpec, layout: SweepLayout, started: datetime, *, status: str,
                  error: str | None, stats: dict[str, object]) -> None:
    """The run's one `runs` row: every option it trained with, its status and measurements."""
    finished = datetime.now(timezone.utc)
    row = {
        "sweep_id": run.sweep_id, "run_id": run.run_id, "base_model": run.base_model.name,
        "base_model_path": run.base_model_path, "rank": run.rank, "alpha": run.alpha,
        "learning_rate": run.learning_rate, "max_steps": run.max_steps, "batch_size": run.batch_size,
        "resolution": run.resolution, "seed": run.seed, "status": status, "error": error,
        "num_images": stats.get("num_images"), "trainable_params": stats.get("trainable_params"),
        "steps_per_s": stats.get("steps_per_s"), "peak_memory_mb": stats.get("peak_memory_mb"),
        "wall_time_s": stats.get("wall_time_s", (finished - started).total_seconds()),
        "started_at": started, "finished_at": finished, "run_dir": str(layout.run_dir(run.run_id)),
        "target_preset": target_preset_of(run.target_modules), "target_modules": list(run.target_modules),
        "lora_dropout": run.lora_dropout, "lr_scheduler": run.lr_scheduler, "lr_warmup_steps": run.lr_warmup_steps,
        "lr_cycles": run.lr_cycles, "gradient_accumulation_steps": run.gradient_accumulation_steps,
        "effective_batch_size": run.effective_batch_size, "min_snr_gamma": run.min_snr_gamma,
        "noise_offset": run.noise_offset, "mixed_precision": run.mixed_precision,
        "gradient_checkpointing": run.gradient_checkpointing, "optimizer": run.optimizer,
        "train_text_encoder": run.train_text_encoder, "text_encoder_lr": run.text_encoder_lr,
        "validation_images": run.validation_images,
        "memory_preset_gib": run.memory_preset.gib if run.memory_preset else None,
        "buckets": run.buckets, "bucket_step": run.bucket_step if run.buckets else None, "encoding_cache": run.cache,
        "skipped_files": stats.get("skipped_files"),
    }
    write_rows("runs", [row], layout.table_file("runs", run.run_id))
