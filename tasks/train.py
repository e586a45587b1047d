"""LoRA training for one run: an explicit loop you can read top to bottom.

VAE latents and text embeddings are computed once (both encoders are frozen; tasks.encodings,
cached on disk by content hash unless `training.cache` says otherwise), then each step draws a
batch (from one aspect-ratio bucket when buckets are on), adds noise at a random timestep,
predicts it with the LoRA-adapted UNet and takes an AdamW step on the LoRA parameters only. A
checkpoint is written at every requested step.
Options (all off by default, see TrainingSpec): LoRA dropout and wider target presets, an LR
schedule with warmup, gradient accumulation (a step = `gradient_accumulation_steps` micro-batches),
Min-SNR loss weighting, offset noise, fp16/bf16 mixed precision, gradient checkpointing, 8-bit
AdamW and a text-encoder LoRA (the text encoders then run every step). Attention is diffusers'
default, PyTorch's scaled_dot_product_attention.
SDXL base models train the same way, their UNet also conditioned on the pooled text embedding and
size ids (tasks.text_conditioning); a text-encoder LoRA goes on both of SDXL's text encoders.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from tasks.base_model import MODEL_BUILD_LOCK, load_pipeline, model_family
from tasks.captions import load_captioner, training_caption
from tasks.checkpoint_io import DIFFUSERS_FILE, checkpoint_complete, load_training_state, save_checkpoint
from tasks.dataset import DatasetItem, crop_sizes
from tasks.dataset_sources import load_items
from tasks.devices import torch_device
from tasks.encodings import encode_training_set
from tasks.kohya_metadata import TrainingFacts
from tasks.plan import CheckpointRef, TrainingRunSpec, checkpoint_id
from tasks.text_conditioning import encode_captions, text_encoders
from tasks.train_options import (check_training_support, diffusion_loss, log_memory_preset, loop_state,
                                 make_optimizer, restore_loop_state, sample_noise)
from tasks.training_presets import TEXT_ENCODER_TARGETS, target_preset_of
from tasks.validation import prepare_validation, split_validation, validation_loss

log = logging.getLogger(__name__)
ADAPTER = "default"
TEXT_ENCODER_STATE_KEYS = ("text_encoder_lora", "text_encoder_2_lora")  # training state keys, per text encoder


@dataclass(frozen=True)
class TrainingResult:
    """What the flow needs to schedule renders: the run id, status and its checkpoints."""

    run_id: str
    status: str
    checkpoints: tuple[CheckpointRef, ...]
    error: str | None = None


def train_lora(run: TrainingRunSpec) -> TrainingResult:
    """Train one run unless its results already exist; a failure is recorded as a failed run row."""
    layout = SweepLayout(Path(run.sweep_root))
    if _already_done(run, layout):
        log.info("run %s: finished earlier, skipping", run.run_id)
        return TrainingResult(run.run_id, "completed", _checkpoint_refs(run, layout))
    started = datetime.now(timezone.utc)
    try:
        stats = _train(run, layout, started)
    except Exception as err:
        _write_run_row(run, layout, started, status="failed", error=f"{type(err).__name__}: {err}", stats={})
        raise
    _write_run_row(run, layout, started, status="completed", error=None, stats=stats)
    return TrainingResult(run.run_id, "completed", _checkpoint_refs(run, layout))


def _train(run: TrainingRunSpec, layout: SweepLayout, started: datetime) -> dict[str, float]:
    device = torch_device()
    check_training_support(run, device)
    family = model_family(run.base_model_path, run.base_model.config)
    log_memory_preset(run)
    captioner = load_captioner(run.dataset.captioner, device=device) if run.dataset.captioner else None
    items = load_items(run.dataset, Path(run.dataset_path), min_size=8, captioner=captioner)
    items, held_out = split_validation(items, run.validation_images, run.seed)
    facts = TrainingFacts(tuple(items), started)  # what the kohya metadata records
    pipe = load_pipeline(run.base_model_path, config=run.base_model.config, device=device)
    validation = prepare_validation(pipe, held_out, run.resolution, run.seed, device) if held_out else None
    resume = _latest_training_state(run, layout)
    # Rows saved before validation_loss existed read as null.
    checkpoint_rows: list[dict[str, object]] = ([{"validation_loss": None, **row} for row in resume["checkpoint_rows"]]
                                                if resume else [])
    losses: list[float] = list(resume["losses"]) if resume else []
    # States saved before LR schedules existed ran at the constant learning rate.
    learning_rates: list[float] = list(resume.get("learning_rates", [run.learning_rate] * len(losses))) if resume else []
    if resume:
        log.info("run %s: resuming after step %d", run.run_id, resume["step"])
    t0 = time.perf_counter()
    elapsed_before = float(resume["elapsed"]) if resume else 0.0
    trained_encoders = text_encoders(pipe)[0] if run.train_text_encoder else []

    def on_checkpoint(step: int, loop: dict) -> None:
        elapsed = elapsed_before + time.perf_counter() - t0
        row = _checkpoint_row(run, layout, step, losses, elapsed)
        row["validation_loss"] = validation_loss(pipe, validation, device) if validation else None
        state = {"step": step, "lora": get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER), **loop,
                 "losses": list(losses), "learning_rates": list(learning_rates),
                 "checkpoint_rows": [*checkpoint_rows, row], "elapsed": elapsed}
        for key, encoder in zip(TEXT_ENCODER_STATE_KEYS, trained_encoders):
            state[key] = get_peft_model_state_dict(encoder, adapter_name=ADAPTER)
        save_checkpoint(run, pipe.unet, ADAPTER, step, row["checkpoint_id"], layout.checkpoint_dir(run.run_id, step),
                        training_state=state, facts=facts, text_encoders=trained_encoders, family=family)
        checkpoint_rows.append(row)

    params = fit_lora(pipe, run, items, device=device, losses=losses, on_checkpoint=on_checkpoint, resume=resume,
                      learning_rates=learning_rates)
    wall = time.perf_counter() - t0
    steps_now = run.max_steps - (resume["step"] if resume else 0)
    loss_rows = [{"sweep_id": run.sweep_id, "run_id": run.run_id, "step": step, "loss": loss, "learning_rate": lr}
                 for step, (loss, lr) in enumerate(zip(losses, learning_rates, strict=True), start=1)]
    write_rows("losses", loss_rows, layout.table_file("losses", run.run_id))
    write_rows("checkpoints", checkpoint_rows, layout.table_file("checkpoints", run.run_id))
    return {
        "wall_time_s": elapsed_before + wall,
        "steps_per_s": steps_now / wall if steps_now else float("nan"),
        "trainable_params": params,
        "num_images": len(items),
        "peak_memory_mb": _peak_memory_mb(device),
    }


def fit_lora(pipe, run: TrainingRunSpec, items: list[DatasetItem], *, device: str, losses: list[float],
             on_checkpoint: Callable[[int, dict], None], resume: dict | None = None,
             learning_rates: list[float] | None = None) -> int:
    """Add LoRA adapters to `pipe.unet` (and its text encoders) and train them in place.

    Appends each step's loss (and learning rate) and calls `on_checkpoint(step, loop_state)` at
    every checkpoint step, `loop_state` holding the optimizer, LR schedule, grad scaler and RNG
    states. With `resume` (a saved training state) it continues after that step and ends with
    exactly the weights an uninterrupted run would have. Returns the trainable parameter count.
    """
    check_training_support(run, device)
    encoders, tokenizers = text_encoders(pipe)
    torch.manual_seed(run.seed)
    unet, vae = pipe.unet, pipe.vae
    trained_encoders = encoders if run.train_text_encoder else []
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)

    # The VAE is frozen, so each image is encoded once (cache "off": every step); so is each caption
    # unless the text encoder trains. With buckets each image keeps its own crop size.
    generator = torch.Generator(device="cpu").manual_seed(run.seed)
    sizes = crop_sizes(items, run.resolution, run.bucket_step if run.buckets else None)
    encoded = encode_training_set(items, sizes, vae, encoders, tokenizers, generator, device, mode=run.cache,
                                  cache_dir=run.cache_dir)

    # Mixed precision: frozen weights are held in the half dtype (half the memory); the LoRA weights
    # and their optimizer state stay fp32, and autocast runs the forward passes in the half dtype.
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(run.mixed_precision)
    if half is not None:
        unet.to(half)
        for encoder in encoders:
            encoder.to(half)
    lora = dict(r=run.rank, lora_alpha=run.alpha, lora_dropout=run.lora_dropout, init_lora_weights="gaussian")
    with MODEL_BUILD_LOCK:
        unet.add_adapter(LoraConfig(**lora, target_modules=list(run.target_modules)), adapter_name=ADAPTER)
        for encoder in trained_encoders:  # peft directly: transformers' add_adapter wants a newer peft
            inject_adapter_in_model(LoraConfig(**lora, target_modules=list(TEXT_ENCODER_TARGETS)), encoder,
                                    adapter_name=ADAPTER)
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    text_params = [p for encoder in trained_encoders for p in encoder.parameters() if p.requires_grad]
    for param in unet_params + text_params:
        param.data = param.data.float()
    if run.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    groups = [{"params": unet_params, "lr": run.learning_rate}]
    if text_params:
        groups.append({"params": text_params, "lr": run.text_encoder_lr})
    optimizer = make_optimizer(run.optimizer, groups)
    lr_schedule = get_scheduler(run.lr_scheduler, optimizer, num_warmup_steps=run.lr_warmup_steps,
                                num_training_steps=run.max_steps, num_cycles=run.lr_cycles)
    # fp16 gradients underflow without loss scaling; disabled (a no-op) for fp32 and bf16.
    scaler = torch.amp.GradScaler("cuda" if device == "cuda" else "cpu", enabled=run.mixed_precision == "fp16")
    first_step = 1
    if resume:
        set_peft_model_state_dict(unet, resume["lora"], adapter_name=ADAPTER)
        for key, encoder in zip(TEXT_ENCODER_STATE_KEYS, trained_encoders):
            set_peft_model_state_dict(encoder, resume[key], adapter_name=ADAPTER)
        restore_loop_state(resume, optimizer, lr_schedule, scaler, generator)
        first_step = resume["step"] + 1
    unet.train()
    for encoder in trained_encoders:
        encoder.train()

    repeats = torch.tensor([item.repeats for item in items], dtype=torch.float)
    ds = run.dataset
    per_step_captions = ds.caption_dropout > 0 or ds.shuffle_tags
    encode_text = per_step_captions or run.train_text_encoder or encoded.text_every_step
    micro, accumulation = run.batch_size, run.gradient_accumulation_steps
    batch = micro * accumulation
    autocast = torch.autocast("cuda" if device == "cuda" else "cpu", dtype=half, enabled=half is not None)

    progress = tqdm(range(first_step, run.max_steps + 1), desc=f"train {run.run_id}", leave=False)
    for step in progress:
        # Everything random in a step is drawn first, for the whole accumulated batch, so batch 2 x
        # 2 accumulation steps sees exactly the examples, noise and timesteps of batch 4.
        index = draw_examples(repeats, sizes, batch, generator)
        captions = [items[i].caption for i in index.tolist()]
        if per_step_captions:  # dropout / tag shuffle change the text each step
            rng = np.random.default_rng([run.seed, step])  # seeded by step, so a resumed run sees the same text
            captions = [training_caption(c, rng, dropout=ds.caption_dropout, shuffle=ds.shuffle_tags,
                                         keep_tokens=ds.keep_tokens) for c in captions]
        clean = encoded.latents_for(index.tolist(), vae, generator, device)
        noise = sample_noise(clean.shape, generator, run.noise_offset)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)

        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for part in range(accumulation):
            rows = slice(part * micro, (part + 1) * micro)
            t, clean_part, noise_part = timesteps[rows].to(device), clean[rows].to(device), noise[rows].to(device)
            noisy = noise_scheduler.add_noise(clean_part, noise_part, t)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(clean_part, noise_part, t)
            else:
                target = noise_part
            with autocast:
                condition = encoded.text.select(index[rows])
                if encode_text:  # the text encoder runs every step
                    condition = condition.with_text(*encode_captions(captions[rows], encoders, tokenizers, device,
                                                                     grad=run.train_text_encoder))
                prediction = unet(noisy, t, **condition.unet_kwargs(device)).sample
            loss = diffusion_loss(prediction, target, t, noise_scheduler, run.min_snr_gamma)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower training.learning_rate")
            scaler.scale(loss / accumulation).backward()  # gradients of the mean over the whole batch
            step_loss += loss.item() / accumulation
        scaler.step(optimizer)  # with fp16: skipped when gradients overflowed, and the scale lowered
        scaler.update()
        if learning_rates is not None:
            learning_rates.append(optimizer.param_groups[0]["lr"])
        lr_schedule.step()

        losses.append(float(step_loss))
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
        if step in run.checkpoint_steps:
            on_checkpoint(step, loop_state(optimizer, lr_schedule, scaler, generator))
            log.info("run %s: checkpoint at step %d (loss %.4f)", run.run_id, step, losses[-1])
    unet.eval()
    for encoder in trained_encoders:
        encoder.eval()
    if run.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    return sum(p.numel() for p in unet_params + text_params)


def draw_examples(repeats: torch.Tensor, sizes: list[tuple[int, int]], batch: int,
                  generator: torch.Generator) -> torch.Tensor:
    """One step's example indices, each drawn with weight `repeats` (kohya repeat folders).

    With one crop size, `batch` independent draws (all-1 repeats: the plain uniform draw). With
    aspect-ratio buckets the first example picks the bucket and the rest come from that bucket, so
    a batch stacks; each example's chance stays proportional to its repeats.
    """
    if len(set(sizes)) == 1:
        if bool((repeats != 1).any()):
            return torch.multinomial(repeats, batch, replacement=True, generator=generator)
        return torch.randint(0, len(sizes), (batch,), generator=generator)
    first = torch.multinomial(repeats, 1, generator=generator)
    same = torch.tensor([i for i, size in enumerate(sizes) if size == sizes[int(first)]])
    if batch == 1:
        return first
    rest = same[torch.multinomial(repeats[same], batch - 1, replacement=True, generator=generator)]
    return torch.cat([first, rest])


def _checkpoint_row(run: TrainingRunSpec, layout: SweepLayout, step: int, losses: list[float],
                    elapsed: float) -> dict[str, object]:
    ckpt_id = checkpoint_id(run.run_id, step)
    folder = layout.checkpoint_dir(run.run_id, step)
    recent = losses[-20:]
    return {
        "sweep_id": run.sweep_id, "run_id": run.run_id, "checkpoint_id": ckpt_id, "step": step,
        "lora_path": str(folder / DIFFUSERS_FILE), "kohya_path": str(folder / f"{ckpt_id}.safetensors"),
        "train_loss_smoothed": sum(recent) / len(recent), "wall_time_s": elapsed,
    }


def _latest_training_state(run: TrainingRunSpec, layout: SweepLayout) -> dict | None:
    """The training state of the last complete checkpoint, so a killed run continues from there."""
    for step in sorted(run.checkpoint_steps, reverse=True):
        folder = layout.checkpoint_dir(run.run_id, step)
        if checkpoint_complete(folder):
            return load_training_state(folder)
    return None


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux; process-wide


def _already_done(run: TrainingRunSpec, layout: SweepLayout) -> bool:
    row_file = layout.table_file("runs", run.run_id)
    if not row_file.exists():
        return False
    import pyarrow.parquet as pq

    status = pq.read_table(row_file, columns=["status"]).column("status").to_pylist()
    return status == ["completed"] and all(
        checkpoint_complete(layout.checkpoint_dir(run.run_id, s)) for s in run.checkpoint_steps
    )


def _checkpoint_refs(run: TrainingRunSpec, layout: SweepLayout) -> tuple[CheckpointRef, ...]:
    return tuple(
        CheckpointRef(run_id=run.run_id, checkpoint_id=checkpoint_id(run.run_id, s), step=s, rank=run.rank,
                      lora_dir=str(layout.checkpoint_dir(run.run_id, s)))
        for s in run.checkpoint_steps
    )


def _write_run_row(run: TrainingRunSpec, layout: SweepLayout, started: datetime, *, status: str,
                   error: str | None, stats: dict[str, float]) -> None:
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
    }
    write_rows("runs", [row], layout.table_file("runs", run.run_id))


def main(argv: list[str]) -> int:
    """`python -m tasks.train RUN_JSON`: train one run in its own process (see tasks.train_process)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = TrainingRunSpec.model_validate_json(Path(argv[0]).read_text())
    try:
        train_lora(run)
    except Exception as err:  # the failed run row is written; the parent reads it
        log.error("run %s failed: %s: %s", run.run_id, type(err).__name__, err)
        return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
