"""Expand a SweepSpec into the training runs and render jobs it implies, each with a content id.

Ids hash everything that determines an artifact, so re-running a sweep finds finished work and
a changed spec gets new ids only where something really changed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tasks.sweep.hashes import file_sha256
from tasks.sweep.ids import content_id, jsonable, with_later_options
from tasks.sweep.model_family import ModelFamily, model_family
from tasks.sweep.presets import MemoryPreset, memory_preset
from tasks.sweep.prompt_syntax import may_render_differently
from tasks.sweep.spec import BaseModelSpec, DatasetSpec, SweepSpec, TrainingSpec


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainingRunSpec(_Frozen):
    """Everything one training run needs: small, serialisable, passed across task boundaries."""

    run_id: str
    sweep_id: str
    sweep_root: str
    base_model: BaseModelSpec
    base_model_path: str  # resolved folder or file (builtins materialised)
    dataset: DatasetSpec
    dataset_path: str
    dataset_fingerprint: str
    rank: int
    alpha: float
    max_steps: int
    checkpoint_steps: tuple[int, ...]
    learning_rate: float
    batch_size: int
    resolution: int
    seed: int
    target_modules: tuple[str, ...]
    # Training options; each default reproduces the plain loop (see TrainingSpec).
    lora_dropout: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_cycles: int = 1
    gradient_accumulation_steps: int = 1
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # set exactly when train_text_encoder is
    validation_images: int = 0  # dataset images held out of training for the validation loss
    memory_preset: MemoryPreset | None = None  # the choice behind resolution, batch size, ...; a record only
    buckets: bool = False  # aspect-ratio buckets (sides multiples of bucket_step)
    bucket_step: int = 64
    cache: Literal["disk", "memory", "off"] = "memory"  # where VAE latents and text outputs are kept
    cache_dir: str | None = None  # set exactly when cache is "disk"
    max_grad_norm: float | None = None  # clip the LoRA gradients' total norm; None: no clipping
    clip_skip: int = 1  # the text encoder's N-th layer from the end conditions the UNet (A1111's Clip skip)

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps


class CheckpointRef(_Frozen):
    """A saved LoRA checkpoint, as the render task needs it."""

    run_id: str
    checkpoint_id: str
    step: int
    rank: int
    lora_dir: str


class ExtraLoraRef(_Frozen):
    """An extra LoRA as a render job needs it: its file's sha256 is part of every id it touches."""

    name: str
    path: str
    weight: float
    sha256: str


class RenderJobSpec(_Frozen):
    """One render task: a base model and one checkpoint (or none, the baseline) over the whole grid."""

    render_id: str
    sweep_id: str
    sweep_root: str
    base_model: BaseModelSpec
    base_model_path: str
    checkpoint: CheckpointRef | None
    prompts: tuple[str, ...]
    negative_prompt: str
    seeds: tuple[int, ...]
    samplers: tuple[str, ...]
    steps: tuple[int, ...]
    lora_weights: tuple[float, ...]
    cfg_scales: tuple[float, ...]
    width: int
    height: int
    trigger_word: str
    baseline_render_id: str | None  # the no-LoRA job of the same base model; None for that job itself
    dataset_path: str
    dataset: DatasetSpec
    concept_trigger: str | None  # set when the dataset is the builtin demo world: score its concept
    clip_model_path: str | None  # a local CLIP folder: adds CLIP scores
    extra_loras: tuple[ExtraLoraRef, ...] = ()  # stacked on every image of the job, the baseline's too
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # resolved by the render task on its device
    prompt_syntax: Literal["a1111", "plain"] = "plain"  # how prompts become conditioning (RenderSpec)


@dataclass(frozen=True)
class PreparedInputs:
    """Resolved, checked inputs: real paths for every base model and the dataset."""

    model_paths: dict[str, str]
    dataset_path: str
    dataset_fingerprint: str
    num_images: int


def sweep_root(spec: SweepSpec) -> Path:
    return Path(spec.output_dir) / spec.name


def training_runs(
    spec: SweepSpec, model_paths: dict[str, str], dataset_path: str, dataset_fingerprint: str
) -> list[TrainingRunSpec]:
    """One run per (base model x rank), in spec order; a memory preset plans for each model's family."""
    t = spec.training
    runs = []
    for model in spec.base_models:
        family = model_family(model_paths[model.name], model.config)
        if t.clip_skip != 1 and family == "sdxl":  # A1111 ignores it for SDXL, sd-scripts refuses it
            raise ValueError(f"training.clip_skip {t.clip_skip} does not apply to SDXL base model {model.name!r} "
                             "(it always uses the penultimate layers); allowed: 1")
        preset, settings = preset_settings(t, family)
        for rank in settings["ranks"]:
            fields = dict(
                base_model=model,
                base_model_path=model_paths[model.name],
                dataset=spec.dataset,
                dataset_path=dataset_path,
                dataset_fingerprint=dataset_fingerprint,
                rank=rank,
                alpha=float(t.alpha if t.alpha is not None else rank),
                max_steps=t.max_steps,
                checkpoint_steps=t.resolved_checkpoint_steps(),
                learning_rate=t.learning_rate,
                batch_size=settings["batch_size"],
                resolution=settings["resolution"],
                seed=t.seed,
                target_modules=t.lora_targets(),
                **_training_options(t, settings, preset, spec.output_dir),
            )
            run_id = f"{model.name}-r{rank}-{run_content_id(fields, model, spec.dataset)}"
            runs.append(
                TrainingRunSpec(run_id=run_id, sweep_id=spec.sweep_id(), sweep_root=str(sweep_root(spec)), **fields)
            )
    return runs


# Never in a run's id: where things are, and records whose effect is already in other fields (the
# memory preset's choice is in resolution, batch size and the rest).
NOT_IN_RUN_ID = ("base_model_path", "dataset_path", "memory_preset", "cache_dir")
# Options added after the first runs were trained, with the values that reproduce runs from before
# them (tasks.sweep.ids.with_later_options). `cache`: a disk cache gives the bits an in-memory one
# does; "off" draws the VAE samples per step, so it enters the id.
TRAINING_OPTIONS = ("lora_dropout", "lr_scheduler", "lr_warmup_steps", "lr_cycles", "gradient_accumulation_steps",
                    "min_snr_gamma", "noise_offset", "mixed_precision", "gradient_checkpointing", "optimizer",
                    "train_text_encoder", "text_encoder_lr", "validation_images", "buckets", "max_grad_norm",
                    "clip_skip")
LATER_RUN_OPTIONS: dict[str, tuple[object, ...]] = {
    **{name: (TrainingRunSpec.model_fields[name].default,) for name in TRAINING_OPTIONS},
    "cache": ("disk", "memory"),
}
# The same for render jobs and images. "auto" precision and no extra LoRAs are the jobs from before
# those options; an image rendered in fp32 keeps its id whether "auto" or "fp32" asked for it.
# A1111 prompt syntax only changes prompts that use it or may be longer than one chunk; for the rest
# it is "plain", what every image was before the option existed (prompt_syntax_in_effect).
LATER_RENDER_OPTIONS: dict[str, tuple[object, ...]] = {"extra_loras": ([],), "precision": ("auto",),
                                                       "prompt_syntax": ("plain",)}
LATER_IMAGE_OPTIONS: dict[str, tuple[object, ...]] = {"extra_loras": ([],), "precision": ("auto", "fp32"),
                                                      "prompt_syntax": ("plain",)}


def run_content_id(fields: dict[str, object], model: BaseModelSpec, dataset: DatasetSpec) -> str:
    """A run's id: every field that shapes its weights; the base model by path, the dataset by content."""
    identity = {k: v for k, v in fields.items() if k not in NOT_IN_RUN_ID and k not in LATER_RUN_OPTIONS}
    identity = with_later_options(identity, {k: fields[k] for k in LATER_RUN_OPTIONS}, LATER_RUN_OPTIONS)
    identity["base_model"] = model.model_dump(exclude={"name"})
    identity["dataset"] = {"trigger_word": dataset.trigger_word}
    return content_id(jsonable(identity), 10)


def preset_settings(t: TrainingSpec, family: ModelFamily) -> tuple[MemoryPreset | None, dict[str, object]]:
    """The memory preset for a base model's family (None without memory_preset_gib) and the settings
    it chooses (resolution, batch_size, ranks, gradient_checkpointing, mixed_precision), each
    replaced by the spec's own value where the user set that key."""
    own = {key: getattr(t, key) for key in MemoryPreset.TRAINING_KEYS}
    if t.memory_preset_gib is None:
        return None, own
    preset = memory_preset(t.memory_preset_gib, family)
    chosen = preset.training_fields()
    return preset, {key: own[key] if key in t.model_fields_set else chosen[key] for key in chosen}


def _training_options(t: TrainingSpec, settings: dict[str, object], preset: MemoryPreset | None,
                      output_dir: str) -> dict[str, object]:
    """The run's copy of the training options, text-encoder LR and memory preset resolved."""
    options: dict[str, object] = {name: getattr(t, name) for name in TRAINING_OPTIONS}
    options["mixed_precision"] = settings["mixed_precision"]
    options["gradient_checkpointing"] = settings["gradient_checkpointing"]
    options["text_encoder_lr"] = (t.text_encoder_lr or t.learning_rate) if t.train_text_encoder else None
    options["memory_preset"] = preset
    options["cache"] = t.cache
    options["cache_dir"] = (t.cache_dir or str(Path(output_dir) / "cache")) if t.cache == "disk" else None
    if t.buckets:  # the step only matters (and only enters the id) with buckets on
        options["bucket_step"] = t.bucket_step
    return options


def render_jobs(
    spec: SweepSpec, model_paths: dict[str, str], checkpoints: list[CheckpointRef], runs: list[TrainingRunSpec],
    dataset_path: str,
) -> list[RenderJobSpec]:
    """A baseline job per base model, then one job per checkpoint of that model's runs."""
    model_of_run = {r.run_id: r.base_model for r in runs}
    r = spec.render
    grid = dict(
        prompts=spec.prompt_texts(),
        negative_prompt=r.negative_prompt,
        seeds=r.seeds,
        samplers=r.samplers,
        steps=r.steps,
        cfg_scales=r.cfg_scales,
        width=r.width,
        height=r.height,
        trigger_word=spec.dataset.trigger_word,
    )
    scoring = dict(
        dataset_path=dataset_path,
        dataset=spec.dataset,
        concept_trigger=spec.dataset.trigger_word if spec.dataset.path == "builtin:demo-world" else None,
        clip_model_path=spec.metrics.clip_model,
    )
    extras = extra_lora_refs(spec)
    jobs = []
    for model in spec.base_models:
        mine = [c for c in checkpoints if model_of_run[c.run_id].name == model.name]
        baseline_id = None
        for ckpt in [None, *mine]:
            weights = (0.0,) if ckpt is None else tuple(w for w in r.lora_weights if w != 0.0)
            if ckpt is not None and not weights:
                continue
            identity = {"model": model.model_dump(), "ckpt": ckpt and ckpt.checkpoint_id, "w": weights, **grid}
            later = {"extra_loras": [x.model_dump(exclude={"path"}) for x in extras], "precision": r.precision,
                     "prompt_syntax": prompt_syntax_in_effect(r.prompt_syntax, grid["prompts"], r.negative_prompt)}
            identity = with_later_options(identity, later, LATER_RENDER_OPTIONS)
            tag = f"{model.name}-baseline" if ckpt is None else ckpt.checkpoint_id
            render_id = f"{tag}-{content_id(jsonable(identity), 10)}"
            baseline_id = baseline_id or render_id
            jobs.append(
                RenderJobSpec(
                    render_id=render_id,
                    sweep_id=spec.sweep_id(),
                    sweep_root=str(sweep_root(spec)),
                    base_model=model,
                    base_model_path=model_paths[model.name],
                    checkpoint=ckpt,
                    lora_weights=weights,
                    baseline_render_id=None if ckpt is None else baseline_id,
                    extra_loras=extras,
                    precision=r.precision,
                    prompt_syntax=r.prompt_syntax,
                    **grid,
                    **scoring,
                )
            )
    return jobs


def extra_lora_refs(spec: SweepSpec) -> tuple[ExtraLoraRef, ...]:
    """The spec's extra LoRAs with their files' sha256 (a changed file re-renders, a moved one does not)."""
    return tuple(ExtraLoraRef(name=x.name, path=x.path, weight=x.weight, sha256=file_sha256(x.path))
                 for x in spec.render.extra_loras)


@dataclass(frozen=True)
class Cell:
    """One image of a render job's grid, before rendering."""

    sampler: str
    steps: int
    cfg_scale: float
    lora_weight: float
    prompt_index: int
    prompt: str
    seed: int


def grid_cells(job: RenderJobSpec) -> list[Cell]:
    """All cells in render order: prompts x seeds innermost, so they batch together."""
    return [
        Cell(sampler, steps, cfg, weight, pi, prompt, seed)
        for weight, sampler, steps, cfg in itertools.product(job.lora_weights, job.samplers, job.steps, job.cfg_scales)
        for (pi, prompt), seed in itertools.product(enumerate(job.prompts), job.seeds)
    ]


def prompt_syntax_in_effect(syntax: str, prompts: Sequence[str], negative_prompt: str) -> str:
    """`syntax`, or "plain" when no prompt (nor the negative) can condition differently under it."""
    if syntax == "plain" or not any(may_render_differently(p) for p in [*prompts, negative_prompt]):
        return "plain"
    return syntax


def image_id(job: RenderJobSpec, cell: Cell) -> str:
    """Identity of an image: everything that determines its pixels."""
    ckpt = job.checkpoint.checkpoint_id if job.checkpoint else None
    weight = cell.lora_weight if ckpt else 0.0
    identity = {
        "model": job.base_model.model_dump(), "checkpoint": ckpt, "sampler": cell.sampler, "steps": cell.steps,
        "cfg": cell.cfg_scale, "weight": weight, "prompt": cell.prompt, "negative": job.negative_prompt,
        "seed": cell.seed, "size": [job.width, job.height],
    }
    later = {"extra_loras": [[x.name, x.sha256, x.weight] for x in job.extra_loras], "precision": job.precision,
             "prompt_syntax": prompt_syntax_in_effect(job.prompt_syntax, [cell.prompt], job.negative_prompt)}
    return content_id(with_later_options(identity, later, LATER_IMAGE_OPTIONS))
