"""A training run's records on disk: its `runs` and `checkpoints` rows, whether it finished, its checkpoints.

No torch: the subprocess and deployment runners read a run's status here without loading a model.
A row is only ever replaced, never deleted (catalog readers never lose its file); one that `tables/runs/`
refuses goes to the run's own folder, and a child that can write nothing tells its parent through a pipe
(docs/faults.md).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from tasks.lora.files import DIFFUSERS_FILE, checkpoint_complete
from tasks.sweep.ids import checkpoint_id
from tasks.sweep.plan import CheckpointRef, TrainingRunSpec
from tasks.sweep.presets import target_preset_of

ERROR_FD_ENV = "LORA_SWEEP_ERROR_FD"  # a training child writes its error to this pipe descriptor
MAX_REPORTED_BYTES = 8192  # below a pipe's buffer: the child never blocks on an unread pipe


@dataclass(frozen=True)
class TrainingResult:
    """What the flow needs to schedule renders: the run id, status and its checkpoints."""

    run_id: str
    status: str
    checkpoints: tuple[CheckpointRef, ...]
    error: str | None = None


def already_done(run: TrainingRunSpec, layout: SweepLayout) -> bool:
    """The run's row says completed and every checkpoint folder is complete; for a run asked to stop early
    (`stop_at`), its checkpoint at that step is complete and recorded, whatever the run did after."""
    if stops_early(run):
        return stop_reached(run, layout)
    row_file = layout.row_file("runs", run.run_id)
    if row_file is None:
        return False
    status = pq.read_table(row_file, columns=["status"]).column("status").to_pylist()
    return status == ["completed"] and all(
        checkpoint_complete(layout.checkpoint_dir(run.run_id, s)) for s in run.checkpoint_steps
    )


def stops_early(run: TrainingRunSpec) -> bool:
    return run.stop_at is not None and run.stop_at < run.max_steps


def stop_reached(run: TrainingRunSpec, layout: SweepLayout) -> bool:
    """The checkpoint at the run's `stop_at` step is complete and its `checkpoints` row written."""
    if run.stop_at is None or not checkpoint_complete(layout.checkpoint_dir(run.run_id, run.stop_at)):
        return False
    rows = layout.row_file("checkpoints", run.run_id)
    return rows is not None and run.stop_at in pq.read_table(rows, columns=["step"]).column("step").to_pylist()


def finished_status(run: TrainingRunSpec) -> str:
    """The `runs` status of a training call that ended well: "stopped" at an early `stop_at`, else "completed"."""
    return "stopped" if stops_early(run) else "completed"


def completed(run: TrainingRunSpec, layout: SweepLayout) -> TrainingResult:
    """The result of a finished run (or of one stopped at its `stop_at`), read from its folders."""
    return TrainingResult(run.run_id, finished_status(run), checkpoint_refs(run, layout))


def checkpoint_refs(run: TrainingRunSpec, layout: SweepLayout) -> tuple[CheckpointRef, ...]:
    """The run's checkpoints (up to its `stop_at` step when it stops early)."""
    last = run.stop_at if stops_early(run) else run.max_steps
    return tuple(
        CheckpointRef(run_id=run.run_id, checkpoint_id=checkpoint_id(run.run_id, s), step=s, rank=run.rank,
                      lora_dir=str(layout.checkpoint_dir(run.run_id, s)))
        for s in run.checkpoint_steps if s <= last
    )


def recorded_error(layout: SweepLayout, run: TrainingRunSpec, since: datetime | None = None) -> str | None:
    """The error of the run's failed row, if it has one; with `since`, only a row of an attempt started
    then or later (an earlier attempt's failure is not this one's)."""
    path = layout.row_file("runs", run.run_id)
    if path is None:
        return None
    rows = pq.read_table(path, columns=["status", "error", "started_at"]).to_pylist()
    if not rows or rows[0]["status"] != "failed":
        return None
    return rows[0]["error"] if since is None or rows[0]["started_at"] >= since else None


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
    """The run's one `runs` row: every option it trained with, its status and measurements. A "running" row
    (an attempt under way) has no finish time yet."""
    finished = None if status == "running" else datetime.now(timezone.utc)
    row = {
        "sweep_id": run.sweep_id, "run_id": run.run_id, "base_model": run.base_model.name,
        "base_model_path": run.base_model_path, "rank": run.rank, "alpha": run.alpha,
        "learning_rate": run.learning_rate, "max_steps": run.max_steps, "batch_size": run.batch_size,
        "resolution": run.resolution, "seed": run.seed, "status": status, "error": error,
        "num_images": stats.get("num_images"), "trainable_params": stats.get("trainable_params"),
        "steps_per_s": stats.get("steps_per_s"), "peak_memory_mb": stats.get("peak_memory_mb"),
        "wall_time_s": stats.get("wall_time_s", (finished - started).total_seconds() if finished else None),
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
        "skipped_files": stats.get("skipped_files"), "max_grad_norm": run.max_grad_norm, "clip_skip": run.clip_skip,
        "variant": run.variant, "dataset_name": run.dataset_name,
        **prior_preservation_columns(run),
        "network": run.network, "network_args": stats.get("network_args"),  # as the kohya file's ss_network_args
    }
    write_row_somewhere(row, layout, run.run_id)


def prior_preservation_columns(run: TrainingRunSpec) -> dict[str, object]:
    """The runs row's prior preservation columns: NULL without it."""
    prior = run.prior_preservation
    return {"class_prompt": prior.class_prompt if prior else None,
            "num_class_images": prior.num_class_images if prior else None,
            "prior_loss_weight": prior.prior_loss_weight if prior else None}


def write_row_somewhere(row: dict[str, object], layout: SweepLayout, run_id: str) -> Path:
    """Write the run's row to `tables/runs/`, or, when that folder refuses it (full, read-only), to the run's
    own folder (SweepLayout.fallback_table_file), where the catalog finds it too. Raises the first error
    when neither place takes it."""
    try:
        return write_rows("runs", [row], layout.table_file("runs", run_id))
    except OSError as err:
        try:
            path = write_rows("runs", [row], layout.fallback_table_file("runs", run_id))
        except OSError:
            raise err from None
        print(f"run {run_id}: its runs row could not be written to {layout.tables_dir} ({err}); wrote it to {path}")
        return path


def error_text(err: BaseException) -> str:
    """How a failure reads in a runs row and the flow's message."""
    return f"{type(err).__name__}: {err}"


def record_failure(run: TrainingRunSpec, layout: SweepLayout, started: datetime, error: str) -> str | None:
    """Write the run's failed row wherever it still fits; None when written, else why it could not be."""
    try:
        write_run_row(run, layout, started, status="failed", error=error, stats={})
    except OSError as err:
        return f"its failed runs row could not be written anywhere: {err}"
    return None


def report_to_parent(message: str) -> None:
    """A training child's last word to its parent, through the pipe named by ERROR_FD_ENV: it needs no disk,
    so the parent learns why even when nothing could be written."""
    fd = os.environ.get(ERROR_FD_ENV)
    if fd:
        with contextlib.suppress(OSError):
            os.write(int(fd), message.encode()[:MAX_REPORTED_BYTES])


def read_reported(fd: int) -> str | None:
    """What a finished child reported through report_to_parent (non-blocking: a grandchild may hold the pipe)."""
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, MAX_REPORTED_BYTES):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace") or None
