"""Parquet schemas: the one source of column names for every table lora-sweep writes.

Each table is written as many small Parquet files (one per task that produced rows);
DuckDB views in `storage/views/` union them. Bump SCHEMA_VERSION on any breaking change.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

RUNS = pa.schema(
    [
        ("sweep_id", pa.string()),
        ("run_id", pa.string()),
        ("base_model", pa.string()),
        ("base_model_path", pa.string()),
        ("rank", pa.int32()),
        ("alpha", pa.float64()),
        ("learning_rate", pa.float64()),
        ("max_steps", pa.int32()),
        ("batch_size", pa.int32()),
        ("resolution", pa.int32()),
        ("seed", pa.int64()),
        ("status", pa.string()),  # "completed" | "failed" | "running" (an attempt under way, or killed)
        ("error", pa.string()),
        ("num_images", pa.int32()),
        ("trainable_params", pa.int64()),
        ("steps_per_s", pa.float64()),
        ("peak_memory_mb", pa.float64()),
        ("wall_time_s", pa.float64()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("run_dir", pa.string()),
        # Training options (tasks.sweep.spec.TrainingSpec); NULL in files written before these columns existed.
        ("target_preset", pa.string()),  # "attention" | "attention+ff" | "locon"; NULL: an explicit module list
        ("target_modules", pa.list_(pa.string())),  # the UNet module names that got LoRA
        ("lora_dropout", pa.float64()),
        ("lr_scheduler", pa.string()),
        ("lr_warmup_steps", pa.int32()),
        ("lr_cycles", pa.int32()),
        ("gradient_accumulation_steps", pa.int32()),
        ("effective_batch_size", pa.int32()),  # batch_size x gradient_accumulation_steps
        ("min_snr_gamma", pa.float64()),  # NULL: plain MSE loss
        ("noise_offset", pa.float64()),
        ("mixed_precision", pa.string()),  # "no" | "fp16" | "bf16"
        ("gradient_checkpointing", pa.bool_()),
        ("optimizer", pa.string()),  # "adamw" | "adamw8bit"
        ("train_text_encoder", pa.bool_()),
        ("text_encoder_lr", pa.float64()),  # NULL unless train_text_encoder
        ("validation_images", pa.int32()),  # dataset images held out of training
        ("memory_preset_gib", pa.float64()),  # NULL: no memory preset
        ("buckets", pa.bool_()),  # aspect-ratio buckets on
        ("bucket_step", pa.int32()),  # NULL unless buckets
        ("skipped_files", pa.list_(pa.string())),  # bad dataset files left out (on_bad_file = "skip"): name: reason
        ("encoding_cache", pa.string()),  # "disk" | "memory" | "off": where VAE latents and text outputs were kept
        ("max_grad_norm", pa.float64()),  # NULL: no gradient clipping (or before it was recorded)
        ("clip_skip", pa.int32()),  # the text-encoder layer from the end that conditioned training; NULL: before
        ("variant", pa.string()),  # the [[training.variants]] entry the run came from; NULL: none
        ("dataset_name", pa.string()),  # the [[datasets]] entry it trained on; NULL: the one [dataset]
        # Prior preservation (training.prior_preservation); all three NULL without it.
        ("class_prompt", pa.string()),
        ("num_class_images", pa.int32()),
        ("prior_loss_weight", pa.float64()),
        # The adapter type (training.network; tasks.lora.networks); NULL: before it was recorded (all were LoRA).
        ("network", pa.string()),  # "lora" | "dora" | "loha" | "lokr"
        ("network_args", pa.string()),  # the kohya file's ss_network_args JSON (LoKr factor, LoCon conv dim/alpha)
    ]
)

CHECKPOINTS = pa.schema(
    [
        ("sweep_id", pa.string()),
        ("run_id", pa.string()),
        ("checkpoint_id", pa.string()),
        ("step", pa.int32()),
        ("lora_path", pa.string()),  # diffusers/peft format
        ("kohya_path", pa.string()),  # A1111 / ComfyUI format
        ("train_loss_smoothed", pa.float64()),
        ("validation_loss", pa.float64()),  # held-out images, fixed timesteps and noise; null without them
        ("wall_time_s", pa.float64()),
    ]
)

LOSSES = pa.schema(
    [
        ("sweep_id", pa.string()),
        ("run_id", pa.string()),
        ("step", pa.int32()),
        ("loss", pa.float64()),
        ("learning_rate", pa.float64()),
        ("grad_norm", pa.float64()),  # LoRA gradients' total norm before clipping; NULL: before it was recorded
        # The class images' loss (prior preservation; `loss` stays the instance images'); NULL without it.
        ("prior_loss", pa.float64()),
    ]
)

IMAGES = pa.schema(
    [
        ("sweep_id", pa.string()),
        ("image_id", pa.string()),
        ("render_id", pa.string()),
        ("base_model", pa.string()),
        ("run_id", pa.string()),  # null for the no-LoRA baseline
        ("checkpoint_id", pa.string()),  # null for the no-LoRA baseline
        ("rank", pa.int32()),  # null for the no-LoRA baseline
        ("checkpoint_step", pa.int32()),  # null for the no-LoRA baseline
        ("sampler", pa.string()),
        ("steps", pa.int32()),
        ("lora_weight", pa.float64()),
        ("cfg_scale", pa.float64()),
        ("prompt_index", pa.int32()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("path", pa.string()),
        ("render_s", pa.float64()),
        # JSON list of the LoRAs stacked on the image besides ours ([{name, path, weight, sha256}]); null: none.
        ("extra_loras", pa.string()),
        ("precision", pa.string()),  # "fp32" | "fp16" | "bf16" the image was rendered in; null: before it was recorded
        ("prompt_syntax", pa.string()),  # "a1111" | "plain": how the prompt conditioned the image; null: before
        ("prompt_tokens", pa.int32()),  # CLIP tokens of the prompt as A1111 counts them (75 per chunk); > 75 plain: cut
        ("clip_skip", pa.int32()),  # A1111's Clip skip the prompt was encoded with (1: last layer); null: before
        ("prompt_source", pa.string()),  # "spec" (render.prompts) | "caption" (render.caption_prompts); null: before
        ("source_image", pa.string()),  # a caption prompt's training image (dataset image id); null for "spec"
        ("held_out", pa.bool_()),  # a caption prompt's image was a held-out validation image; null for "spec"
    ]
)

# Long format: one row per (image, metric). Units live in the metric name (e.g. "psnr_db").
IMAGE_METRICS = pa.schema(
    [
        ("sweep_id", pa.string()),
        ("image_id", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("higher_is_better", pa.bool_()),
        ("reference_id", pa.string()),  # e.g. the nearest training image, or the baseline image
    ]
)

# One row per render job: what became of it in the sweep's last flow run. Written by the flow, which sees
# every outcome (an exception in the task, a killed worker, a task that never started).
RENDERS = pa.schema(
    [
        ("sweep_id", pa.string()),
        ("render_id", pa.string()),
        ("base_model", pa.string()),
        ("run_id", pa.string()),  # null for the no-LoRA baseline
        ("checkpoint_id", pa.string()),  # null for the no-LoRA baseline
        ("checkpoint_step", pa.int32()),  # null for the no-LoRA baseline
        ("status", pa.string()),  # "completed" | "failed"
        ("error", pa.string()),  # null unless failed
        ("planned_images", pa.int32()),  # the job's grid cells
        ("recorded_at", pa.timestamp("us", tz="UTC")),  # when the flow first saw this outcome
    ]
)

# An adaptive sweep's ladder (`[search] strategy = "halving"`, flows/halving.py): one row per run per rung it
# reached, with the metric it was compared on and the decision. One file per sweep; empty for a grid sweep.
LADDER = pa.schema(
    [
        ("sweep_id", pa.string()),
        ("run_id", pa.string()),
        ("rung", pa.int32()),  # 1, 2, ...; the last is the final comparison at max_steps
        ("step", pa.int32()),  # the checkpoint step compared: what the run had trained when decided
        ("metric", pa.string()),
        ("value", pa.float64()),  # mean over the checkpoint's LoRA images, or its validation loss; null: failed
        ("higher_is_better", pa.bool_()),
        ("place", pa.int32()),  # 1 = best at this rung; ties go to the smaller run id; null: failed
        ("competitors", pa.int32()),  # runs compared at this rung
        ("kept", pa.int32()),  # runs the rung promotes (at the final rung: 1, the best)
        ("decision", pa.string()),  # "promoted" | "pruned" | "best" | "finished" | "failed"
    ]
)

TABLES: dict[str, pa.Schema] = {
    "runs": RUNS,
    "checkpoints": CHECKPOINTS,
    "losses": LOSSES,
    "images": IMAGES,
    "image_metrics": IMAGE_METRICS,
    "renders": RENDERS,
    "ladder": LADDER,
}
