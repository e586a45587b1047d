"""LoRA training for one run: an explicit loop you can read top to bottom.

VAE latents and text embeddings are computed once (both encoders are frozen), then each step
adds noise at a random timestep, predicts it with the LoRA-adapted UNet and takes an AdamW
step on the LoRA parameters only. A checkpoint is written at every requested step.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from tasks.base_model import MODEL_BUILD_LOCK, load_pipeline
from tasks.checkpoint_io import DIFFUSERS_FILE, checkpoint_complete, load_training_state, save_checkpoint
import numpy as np

from tasks.captions import load_captioner, training_caption
from tasks.dataset import DatasetItem, load_training_image
from tasks.dataset_sources import load_items
from tasks.plan import CheckpointRef, TrainingRunSpec, checkpoint_id

log = logging.getLogger(__name__)
ADAPTER = "default"


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
        stats = _train(run, layout)
    except Exception as err:
        _write_run_row(run, layout, started, status="failed", error=f"{type(err).__name__}: {err}", stats={})
        raise
    _write_run_row(run, layout, started, status="completed", error=None, stats=stats)
    return TrainingResult(run.run_id, "completed", _checkpoint_refs(run, layout))


def _train(run: TrainingRunSpec, layout: SweepLayout) -> dict[str, float]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    captioner = load_captioner(run.dataset.captioner, device=device) if run.dataset.captioner else None
    items = load_items(run.dataset, Path(run.dataset_path), min_size=8, captioner=captioner)
    pipe = load_pipeline(run.base_model_path, config=run.base_model.config, device=device)
    resume = _latest_training_state(run, layout)
    checkpoint_rows: list[dict[str, object]] = list(resume["checkpoint_rows"]) if resume else []
    losses: list[float] = list(resume["losses"]) if resume else []
    if resume:
        log.info("run %s: resuming after step %d", run.run_id, resume["step"])
    t0 = time.perf_counter()
    elapsed_before = float(resume["elapsed"]) if resume else 0.0

    def on_checkpoint(step: int, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        elapsed = elapsed_before + time.perf_counter() - t0
        row = _checkpoint_row(run, layout, step, losses, elapsed)
        state = {"step": step, "lora": get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER),
                 "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                 "losses": list(losses), "checkpoint_rows": [*checkpoint_rows, row], "elapsed": elapsed}
        save_checkpoint(run, pipe.unet, ADAPTER, step, row["checkpoint_id"], layout.checkpoint_dir(run.run_id, step),
                        training_state=state)
        checkpoint_rows.append(row)

    params = fit_lora(pipe, run, items, device=device, losses=losses, on_checkpoint=on_checkpoint, resume=resume)
    wall = time.perf_counter() - t0
    steps_now = run.max_steps - (resume["step"] if resume else 0)
    loss_rows = [{"sweep_id": run.sweep_id, "run_id": run.run_id, "step": step, "loss": loss,
                  "learning_rate": run.learning_rate} for step, loss in enumerate(losses, start=1)]
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
             on_checkpoint: Callable[[int, torch.optim.Optimizer, torch.Generator], None],
             resume: dict | None = None) -> int:
    """Add a LoRA adapter to `pipe.unet` and train it in place; returns the trainable parameter count.

    Appends each step's loss to `losses` and calls `on_checkpoint(step, optimizer, generator)` at
    every checkpoint step. With `resume` (a saved training state) it continues after that step and
    ends with exactly the weights an uninterrupted run would have.
    """
    torch.manual_seed(run.seed)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)

    # Both encoders are frozen, so each image and caption is encoded once, not once per step.
    generator = torch.Generator(device="cpu").manual_seed(run.seed)
    latents, embeddings = _encode_dataset(items, run.resolution, vae, text_encoder, tokenizer, generator, device)

    with MODEL_BUILD_LOCK:
        unet.add_adapter(
            LoraConfig(r=run.rank, lora_alpha=run.alpha, init_lora_weights="gaussian",
                       target_modules=list(run.target_modules)),
            adapter_name=ADAPTER,
        )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.learning_rate, weight_decay=1e-2)
    first_step = 1
    if resume:
        set_peft_model_state_dict(unet, resume["lora"], adapter_name=ADAPTER)
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        first_step = resume["step"] + 1
    unet.train()

    # kohya-style repeats weight the sampling; all-1 keeps the plain uniform draw (and its RNG stream).
    repeats = torch.tensor([item.repeats for item in items], dtype=torch.float)
    weighted = bool((repeats != 1).any())
    ds = run.dataset
    per_step_captions = ds.caption_dropout > 0 or ds.shuffle_tags

    progress = tqdm(range(first_step, run.max_steps + 1), desc=f"train {run.run_id}", leave=False)
    for step in progress:
        if weighted:
            index = torch.multinomial(repeats, run.batch_size, replacement=True, generator=generator)
        else:
            index = torch.randint(0, len(items), (run.batch_size,), generator=generator)
        if per_step_captions:  # dropout / tag shuffle change the text each step: encode it each step
            rng = np.random.default_rng([run.seed, step])  # seeded by step, so a resumed run sees the same text
            captions = [training_caption(items[i].caption, rng, dropout=ds.caption_dropout, shuffle=ds.shuffle_tags,
                                         keep_tokens=ds.keep_tokens) for i in index.tolist()]
            encoder_states = _encode_captions(captions, text_encoder, tokenizer, device)
        else:
            encoder_states = embeddings[index].to(device)
        clean = latents[index].to(device)
        noise = torch.randn(clean.shape, generator=generator).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (run.batch_size,),
                                  generator=generator).to(device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(clean, noise, timesteps)
        else:
            target = noise

        prediction = unet(noisy, timesteps, encoder_states).sample
        loss = F.mse_loss(prediction.float(), target.float())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower training.learning_rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        losses.append(float(loss.item()))
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
        if step in run.checkpoint_steps:
            on_checkpoint(step, optimizer, generator)
            log.info("run %s: checkpoint at step %d (loss %.4f)", run.run_id, step, losses[-1])
    unet.eval()
    return sum(p.numel() for p in params)


def _encode_dataset(items: list[DatasetItem], resolution: int, vae, text_encoder, tokenizer,
                    generator: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latents (scaled) and text-encoder hidden states for every training example."""
    pixels = torch.stack([
        torch.from_numpy(load_training_image(item.path, resolution)).permute(2, 0, 1) for item in items
    ])
    with torch.no_grad():
        latents = []
        for chunk in pixels.split(8):
            dist = vae.encode(chunk.to(device, vae.dtype)).latent_dist
            latents.append(dist.sample(generator=generator).cpu() if device == "cpu" else dist.sample().cpu())
    embeddings = _encode_captions([item.caption for item in items], text_encoder, tokenizer, device).cpu()
    return torch.cat(latents) * vae.config.scaling_factor, embeddings


def _encode_captions(captions: list[str], text_encoder, tokenizer, device: str) -> torch.Tensor:
    """Frozen text-encoder hidden states for a list of captions (truncated at the tokenizer's 77 tokens)."""
    tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                       return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(tokens.to(device))[0]


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
