"""One training run, start to finish: load its data and model, train (tasks.train.loop), save a
checkpoint at every checkpoint step, record its rows. A killed run resumes from its last checkpoint.

`python -m tasks.train.run RUN_JSON` trains one run in its own process (tasks.train.child_process).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict

from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from tasks.data.captions import load_captioner
from tasks.data.dataset import MIN_IMAGE_SIDE
from tasks.data.sources import load_dataset
from tasks.lora.export import save_checkpoint
from tasks.lora.files import checkpoint_complete
from tasks.lora.kohya_metadata import TrainingFacts
from tasks.lora.networks import network_metadata
from tasks.models.base_model import load_pipeline, model_family
from tasks.models.pipeline_pool import release_idle_pipelines
from tasks.models.text_conditioning import text_encoders
from tasks.sweep.devices import torch_device
from tasks.sweep.plan import TrainingRunSpec
from tasks.train.class_images import class_images_missing, ensure_class_images
from tasks.train.loop import ADAPTER, HALF_DTYPES, TEXT_ENCODER_STATE_KEYS, TrainingHistory, fit_lora
from tasks.train.records import (
    TrainingResult,
    already_done,
    checkpoint_row,
    completed,
    error_text,
    finished_status,
    record_failure,
    report_to_parent,
    write_run_row,
)
from tasks.train.state import load_training_state
from tasks.train.support import check_training_support, log_memory_preset
from tasks.train.validation import prepare_validation, split_validation, validation_loss

log = logging.getLogger(__name__)


def train_lora(run: TrainingRunSpec) -> TrainingResult:
    """Train one run unless its results already exist; a failure is recorded as a failed run row."""
    layout = SweepLayout(Path(run.sweep_root))
    if already_done(run, layout):
        log.info("run %s: finished earlier, skipping", run.run_id)
        return completed(run, layout)
    if run.stop_at is not None and run.stop_at not in run.checkpoint_steps:
        raise ValueError(f"run {run.run_id}: stop_at {run.stop_at} is not one of its checkpoint steps "
                         f"{list(run.checkpoint_steps)}; allowed: one of them (training stops at a saved checkpoint)")
    started = datetime.now(timezone.utc)
    try:
        stats = _train(run, layout, started)
        write_run_row(run, layout, started, status=finished_status(run), error=None, stats=stats)
    except Exception as err:
        unrecorded = record_failure(run, layout, started, error_text(err))  # a full disk may refuse even this
        if unrecorded:
            log.error("run %s: %s", run.run_id, unrecorded)
        raise
    return completed(run, layout)


def _train(run: TrainingRunSpec, layout: SweepLayout, started: datetime) -> dict[str, object]:
    device = torch_device()
    check_training_support(run, device)  # before any model is loaded
    family = model_family(run.base_model_path, run.base_model.config)
    log_memory_preset(run)
    captioner = load_captioner(run.dataset.captioner, device=device) if run.dataset.captioner else None
    loaded = load_dataset(run.dataset, Path(run.dataset_path), min_size=min(MIN_IMAGE_SIDE, run.resolution),
                          captioner=captioner)
    items, held_out = split_validation(loaded.items, run.validation_images, run.seed)
    # Mixed precision: the UNet loads straight in its half dtype (setup would cast it there), so an SDXL UNet
    # never sits on the device in fp32 (10.3 GB). Class images still to render (prior preservation) render
    # with the fp32 base model first, so then the UNet loads in fp32 and setup casts it.
    unet_dtype = None if class_images_missing(run) else HALF_DTYPES.get(run.mixed_precision)
    release_idle_pipelines()  # an idle render pipeline must not hold memory this run needs
    pipe = load_pipeline(run.base_model_path, config=run.base_model.config, unet_dtype=unet_dtype, device=device)
    # Prior preservation: the base model renders the class images (once, cached) before any LoRA is added.
    class_items = ensure_class_images(run, pipe, device) if run.prior_preservation else []
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    facts = TrainingFacts(tuple(items), started, loaded.skipped, prediction, tuple(class_items))  # for kohya metadata
    validation = prepare_validation(pipe, held_out, run.resolution, run.seed, device) if held_out else None
    resume = latest_training_state(run, layout)
    if resume:
        log.info("run %s: resuming after step %d", run.run_id, resume["step"])
    before = TrainingHistory(*resumed_history(run, resume))
    checkpoint_rows = resumed_checkpoint_rows(resume)
    elapsed_before = float(resume["elapsed"]) if resume else 0.0
    trained_encoders = text_encoders(pipe)[0] if run.train_text_encoder else []
    t0 = time.perf_counter()

    def on_checkpoint(step: int, loop: dict, now: TrainingHistory) -> None:
        losses, learning_rates = before.losses + now.losses, before.learning_rates + now.learning_rates
        grad_norms, prior_losses = before.grad_norms + now.grad_norms, before.prior_losses + now.prior_losses
        elapsed = elapsed_before + time.perf_counter() - t0
        row = checkpoint_row(run, layout, step, losses, elapsed)
        row["validation_loss"] = validation_loss(pipe, validation, device) if validation else None
        state = {"step": step, "lora": get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER), **loop,
                 "losses": losses, "learning_rates": learning_rates, "grad_norms": grad_norms, "prior_losses": prior_losses,
                 "checkpoint_rows": [*checkpoint_rows, row], "elapsed": elapsed}
        for key, encoder in zip(TEXT_ENCODER_STATE_KEYS, trained_encoders):
            state[key] = get_peft_model_state_dict(encoder, adapter_name=ADAPTER)
        save_checkpoint(run, pipe.unet, ADAPTER, step, row["checkpoint_id"], layout.checkpoint_dir(run.run_id, step),
                        training_state=state, facts=facts, text_encoders=trained_encoders, family=family)
        checkpoint_rows.append(row)

    history = fit_lora(pipe, run, items, device=device, on_checkpoint=on_checkpoint, resume=resume,
                       class_items=class_items)
    wall = time.perf_counter() - t0
    write_rows("losses", loss_rows(run, before, history), layout.table_file("losses", run.run_id))
    write_rows("checkpoints", checkpoint_rows, layout.table_file("checkpoints", run.run_id))
    steps_now = len(history.losses)
    return {
        "wall_time_s": elapsed_before + wall,
        "steps_per_s": steps_now / wall if steps_now else None,  # resumed at its last checkpoint: nothing timed
        "trainable_params": history.trainable_params,
        "num_images": len(items),
        "peak_memory_mb": peak_memory_mb(device),
        "skipped_files": list(loaded.skipped),
        "network_args": network_metadata(run)["ss_network_args"],
    }


def loss_rows(run: TrainingRunSpec, before: TrainingHistory, now: TrainingHistory) -> list[dict[str, object]]:
    """One `losses` row per step: `loss` is the instance images' loss (what a run without prior preservation
    minimises), `prior_loss` the class images' (NULL without prior preservation)."""
    columns = zip(before.losses + now.losses, before.learning_rates + now.learning_rates,
                  before.grad_norms + now.grad_norms, before.prior_losses + now.prior_losses, strict=True)
    return [{"sweep_id": run.sweep_id, "run_id": run.run_id, "step": step, "loss": loss, "learning_rate": lr,
             "grad_norm": norm, "prior_loss": prior} for step, (loss, lr, norm, prior) in enumerate(columns, start=1)]


def latest_training_state(run: TrainingRunSpec, layout: SweepLayout) -> dict | None:
    """The training state of the last complete checkpoint, so a killed run continues from there."""
    for step in sorted(run.checkpoint_steps, reverse=True):
        folder = layout.checkpoint_dir(run.run_id, step)
        if checkpoint_complete(folder):
            return load_training_state(folder)
    return None


def resumed_history(run: TrainingRunSpec, resume: dict | None
                    ) -> tuple[list[float], list[float], list[float | None], list[float | None]]:
    """Losses, learning rates, gradient norms and class-image losses of the steps before a resume; states saved
    before LR schedules existed ran at the constant learning rate, those saved before gradient norms or prior
    preservation existed have none of those."""
    if not resume:
        return [], [], [], []
    losses = list(resume["losses"])
    return (losses, list(resume.get("learning_rates", [run.learning_rate] * len(losses))),
            list(resume.get("grad_norms", [None] * len(losses))), list(resume.get("prior_losses", [None] * len(losses))))


def resumed_checkpoint_rows(resume: dict | None) -> list[dict[str, object]]:
    """Checkpoint rows saved before the resume; rows saved before validation_loss existed read as null."""
    return [{"validation_loss": None, **row} for row in resume["checkpoint_rows"]] if resume else []


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux; process-wide


def main(argv: list[str]) -> int:
    """`python -m tasks.train.run RUN_JSON`: train one run in its own process (see tasks.train.child_process)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = TrainingRunSpec.model_validate_json(Path(argv[0]).read_text())
    try:
        train_lora(run)
    except Exception as err:  # the failed run row is written where it fits; the parent reads it or this report
        log.error("run %s failed: %s", run.run_id, error_text(err))
        report_to_parent(error_text(err))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
