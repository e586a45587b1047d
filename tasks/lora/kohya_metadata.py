"""The kohya `ss_*` metadata of a saved LoRA, and the hashes AUTOMATIC1111 shows for it.

A1111's Lora extension names a LoRA in "Lora hashes" by the first 12 hex digits of its
`sshs_model_hash` metadata, or, without it, of the sd-webui-additional-networks ("addnet") hash:
sha256 of the safetensors file after its header. kohya precomputes both sshs hashes over the file
as saved with only its `ss_*` metadata, so editing other metadata later changes neither. Base-model
hashes are A1111's too (tasks.models.base_model). All metadata values are strings.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch

from tasks.data.dataset import DatasetItem, crop_sizes, item_size
from tasks.lora.networks import network_metadata
from tasks.sweep.hashes import addnet_hash, addnet_legacy_hash, legacy_model_hash, model_sha256
from tasks.sweep.plan import TrainingRunSpec
from tasks.sweep.spec import DatasetSpec

# Per base-model family: kohya's ss_base_model_version and the modelspec architecture A1111/ComfyUI read.
BASE_MODEL_VERSIONS = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURES = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
# As sd-scripts writes ss_optimizer: the class's module path and name, then its arguments.
OPTIMIZER_NAMES = {"adamw": "torch.optim.adamw.AdamW(weight_decay=0.01)",
                   "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01)"}
# sd-scripts' library/sai_model_spec.py: a LoRA of SDXL names Stability's implementation, of SD1.x diffusers.
IMPLEMENTATIONS = {"sd15": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}
MODELSPEC_VERSION = "1.0.1"


@dataclass(frozen=True)
class TrainingFacts:
    """What only the training task knows: the items it trains on (held-out ones excluded) and its start."""

    items: tuple[DatasetItem, ...]
    started: datetime
    skipped: tuple[str, ...] = ()  # bad files left out of the dataset (dataset.on_bad_file = "skip")
    prediction_type: str = "epsilon"  # the base model scheduler's: "epsilon" or "v_prediction"
    class_items: tuple[DatasetItem, ...] = ()  # prior preservation's class images (kohya's regularisation images)


def kohya_metadata(run: TrainingRunSpec, step: int, family: str, facts: TrainingFacts) -> dict[str, str]:
    """The `ss_*` fields A1111, ComfyUI and civitai read from a kohya LoRA, plus modelspec and our run id.

    Without the `sshs_*` hashes: `with_hashes` adds them once the tensors are known.
    """
    return {
        **_network_fields(run, family),
        **_training_fields(run, step),
        **_dataset_fields(run, step, facts),
        "ss_training_started_at": str(facts.started.timestamp()),
        "ss_training_finished_at": str(datetime.now(timezone.utc).timestamp()),
        "ss_output_name": run.run_id,
        **modelspec_fields(run, family, facts),
        "lora_sweep.run_id": run.run_id,
        **({"lora_sweep.skipped_files": json.dumps(list(facts.skipped))} if facts.skipped else {}),
    }


def modelspec_fields(run: TrainingRunSpec, family: str, facts: TrainingFacts) -> dict[str, str]:
    """The `modelspec.*` keys sd-scripts writes for a LoRA (Stability's ModelSpec 1.0.1)."""
    prediction = "v" if facts.prediction_type == "v_prediction" else "epsilon"
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": ARCHITECTURES[family],
        "modelspec.implementation": IMPLEMENTATIONS[family],
        "modelspec.title": run.run_id,
        "modelspec.resolution": f"{run.resolution}x{run.resolution}",
        "modelspec.date": datetime.fromtimestamp(int(facts.started.timestamp())).isoformat(),
        "modelspec.prediction_type": prediction,
    }


def with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """`metadata` plus kohya's `sshs_model_hash` and `sshs_legacy_hash`, computed on the file as it
    would be saved with only the `ss_*` fields (so later edits to other metadata change neither)."""
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    stream = io.BytesIO(safetensors.torch.save(tensors, metadata=training_only))
    return {**metadata, "sshs_model_hash": addnet_hash(stream), "sshs_legacy_hash": addnet_legacy_hash(stream)}


def samples_per_epoch(items: tuple[DatasetItem, ...] | list[DatasetItem]) -> int:
    """Images seen per epoch as kohya counts them: each item `repeats` times."""
    return sum(item.repeats for item in items)


def dataset_dir(item: DatasetItem, ds: DatasetSpec) -> str:
    """kohya's name for the subset an item came from: its folder (e.g. `10_name`), or, for a captions
    file source, that file's name (as kohya names a fine-tuning subset by its metadata file)."""
    if ds.source == "metadata_jsonl":
        return Path(ds.metadata_file).name
    if ds.source == "csv":
        return Path(ds.csv_file or "").name
    return item.path.parent.name


def dataset_dirs(items: tuple[DatasetItem, ...], ds: DatasetSpec) -> dict[str, dict[str, int]]:
    """kohya's `ss_dataset_dirs`: {subset name: {"n_repeats", "img_count"}}."""
    counts: dict[str, Counter[int]] = defaultdict(Counter)
    for item in items:
        counts[dataset_dir(item, ds)][item.repeats] += 1
    # A kohya folder has one repeat count; a sidecar folder has 1 for every image.
    return {name: {"n_repeats": repeats.most_common(1)[0][0], "img_count": sum(repeats.values())}
            for name, repeats in counts.items()}


def tag_frequency(items: tuple[DatasetItem, ...], ds: DatasetSpec) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: per subset, how many training captions hold each comma-separated tag
    (stripped and lower-cased, as kohya counts them; each image once, whatever its repeats)."""
    frequency: dict[str, Counter[str]] = defaultdict(Counter)
    for item in items:
        tags = (tag.strip().lower() for tag in item.caption.split(","))
        frequency[dataset_dir(item, ds)].update(tag for tag in tags if tag)
    return {name: dict(counts) for name, counts in frequency.items()}


def _network_fields(run: TrainingRunSpec, family: str) -> dict[str, str]:
    return {
        # kohya's networks.lora for LoRA; LyCORIS' lycoris.kohya with its algo for DoRA, LoHa and LoKr
        **network_metadata(run),
        "ss_network_dim": str(run.rank),
        "ss_network_alpha": str(run.alpha),
        "ss_network_dropout": str(run.lora_dropout),
        "ss_network_train_unet_only": str(not run.train_text_encoder),
        "ss_base_model_version": BASE_MODEL_VERSIONS[family],
        "ss_v2": "False",
        "ss_sd_model_name": run.base_model.name,
        # A single file: A1111's own hashes of it. A diffusers folder: those of its unet weights, what
        # tasks.models.base_model.model_hash (the PNGs' "Model hash") hashes; A1111 cannot load such a folder.
        "ss_sd_model_hash": legacy_model_hash(run.base_model_path),
        "ss_new_sd_model_hash": model_sha256(run.base_model_path),
        # sd-scripts writes str(args.clip_skip): "None" is its default, the last layer (A1111's "Clip skip: 1");
        # SDXL always uses the penultimate layers and refuses clip_skip (tasks.sweep.plan).
        "ss_clip_skip": str(run.clip_skip) if run.clip_skip > 1 else "None",
        "ss_max_token_length": "None",  # 75 tokens, one CLIP window
    }


def _training_fields(run: TrainingRunSpec, step: int) -> dict[str, str]:
    return {
        "ss_resolution": f"({run.resolution}, {run.resolution})",
        "ss_steps": str(step),
        "ss_max_train_steps": str(run.max_steps),
        "ss_learning_rate": str(run.learning_rate),
        "ss_unet_lr": str(run.learning_rate),
        "ss_text_encoder_lr": str(run.text_encoder_lr),  # "None" without a text-encoder LoRA, as sd-scripts
        "ss_lr_scheduler": run.lr_scheduler,
        "ss_lr_warmup_steps": str(run.lr_warmup_steps),
        "ss_gradient_accumulation_steps": str(run.gradient_accumulation_steps),
        "ss_min_snr_gamma": str(run.min_snr_gamma),
        "ss_noise_offset": str(run.noise_offset),
        # sd-scripts writes str(args.max_grad_norm), where 0.0 means no clipping (its default is 1.0); a
        # reader parses the value as a float, so no clipping is "0.0", never "None".
        "ss_max_grad_norm": str(float(run.max_grad_norm or 0.0)),
        "ss_mixed_precision": run.mixed_precision,
        "ss_gradient_checkpointing": str(run.gradient_checkpointing),
        "ss_optimizer": OPTIMIZER_NAMES[run.optimizer],
        "ss_seed": str(run.seed),
        "ss_batch_size_per_device": str(run.batch_size),
        "ss_total_batch_size": str(run.effective_batch_size),
    }


def _dataset_fields(run: TrainingRunSpec, step: int, facts: TrainingFacts) -> dict[str, str]:
    ds = run.dataset
    per_epoch = samples_per_epoch(facts.items)
    return {
        "ss_epoch": str(math.ceil(step * run.effective_batch_size / per_epoch)),
        "ss_num_train_images": str(per_epoch),
        **regularisation_fields(run, facts),
        "ss_dataset_dirs": json.dumps(dataset_dirs(facts.items, ds)),
        "ss_tag_frequency": json.dumps(tag_frequency(facts.items, ds)),
        "ss_caption_dropout_rate": str(ds.caption_dropout),
        "ss_shuffle_caption": str(ds.shuffle_tags),
        "ss_keep_tokens": str(ds.keep_tokens),
        "ss_enable_bucket": str(run.buckets),
        "ss_bucket_no_upscale": "False",
        "ss_bucket_info": json.dumps(bucket_info(run, facts.items)) if run.buckets else "null",
        "ss_cache_latents": str(run.cache != "off"),
    }


def regularisation_fields(run: TrainingRunSpec, facts: TrainingFacts) -> dict[str, str]:
    """Prior preservation as sd-scripts records regularisation images: their count (repeats included; ours are
    1), {folder name: {"n_repeats", "img_count"}} and the prior loss weight (sd-scripts' default 1.0 without)."""
    prior, items = run.prior_preservation, facts.class_items
    dirs = {items[0].path.parent.name: {"n_repeats": 1, "img_count": len(items)}} if items else {}
    return {"ss_num_reg_images": str(len(items)), "ss_reg_dataset_dirs": json.dumps(dirs),
            "ss_prior_loss_weight": str(prior.prior_loss_weight if prior else 1.0)}


def bucket_info(run: TrainingRunSpec, items: tuple[DatasetItem, ...]) -> dict[str, object]:
    """kohya's `ss_bucket_info`: each bucket's resolution (w, h) and image count, repeats included (sd-scripts
    adds an image to its bucket once per repeat), and the mean difference between an image's aspect ratio
    and its bucket's, over images."""
    buckets = crop_sizes(list(items), run.resolution, run.bucket_step)
    error = sum(abs(w / h - bw / bh) for (w, h), (bw, bh) in zip(map(item_size, items), buckets, strict=True))
    counts = Counter()
    for item, bucket in zip(items, buckets, strict=True):
        counts[bucket] += item.repeats
    counts = sorted(counts.items())
    return {"buckets": {str(i): {"resolution": list(size), "count": n} for i, (size, n) in enumerate(counts)},
            "mean_img_ar_error": error / len(items)}
