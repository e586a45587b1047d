"""Expand a SweepSpec into the training runs and render jobs it implies, each with a content id.

Ids hash everything that determines an artifact, so re-running a sweep finds finished work and
a changed spec gets new ids only where something really changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tasks.sweep.axes import TrainingConfig
from tasks.sweep.caption_prompts import CaptionPrompt
from tasks.sweep.cells import prompt_syntax_in_effect
from tasks.sweep.hashes import file_sha256
from tasks.sweep.ids import content_id, jsonable, with_later_options
from tasks.sweep.model_family import ModelFamily, model_family
from tasks.sweep.presets import MemoryPreset, memory_preset
from tasks.sweep.prior_preservation import PriorPreservationSpec
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
    prior_preservation: PriorPreservationSpec | None = None  # class images trained beside the instance images
    network: Literal["lora", "dora", "loha", "lokr"] = "lora"  # the adapter type (tasks.lora.networks)
    lokr_factor: int = -1  # LoKr's dimension split; -1: automatic
    # DoRA's magnitude axis, set exactly for DoRA runs; None on a DoRA run: one from before the option (output)
    dora_axis: Literal["input", "output"] | None = None
    conv_rank: int | None = None  # LoCon k x k convolutions' own rank and alpha; None: the run's
    conv_alpha: float | None = None
    variant: str | None = None  # the [[training.variants]] entry it came from (a label; not in the id)
    dataset_name: str | None = None  # the [[datasets]] entry it trains on (a label; not in the id)
    # Train only up to this checkpoint step and return (an adaptive sweep's rung, flows/halving.py); a later
    # call resumes from there. None: to max_steps. Not in the id: the weights at each step are the same.
    stop_at: int | None = None

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
    clip_skips: tuple[int, ...] = (1,)  # A1111's Clip skip, an axis of the grid (RenderSpec.clip_skip)
    caption_prompts: tuple[CaptionPrompt, ...] = ()  # training captions, a second prompt set (caption_prompts.py)


@dataclass(frozen=True)
class PreparedInputs:
    """Resolved, checked inputs: real paths for every base model and the dataset."""

    model_paths: dict[str, str]
    dataset_path: str
    dataset_fingerprint: str
    num_images: int
    dataset_variants: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (path, fingerprint)
    caption_prompts: tuple[CaptionPrompt, ...] = ()  # render.caption_prompts resolved from the dataset


def sweep_root(spec: SweepSpec) -> Path:
    return Path(spec.output_dir) / spec.name


def training_runs(
    spec: SweepSpec, model_paths: dict[str, str], dataset_path: str, dataset_fingerprint: str,
    datasets: Mapping[str, tuple[str, str]] | None = None,
) -> list[TrainingRunSpec]:
    """One run per base model x dataset x training configuration x rank, in spec order; a memory preset
    plans for each model's family. `datasets` maps each named dataset variant to its prepared (path,
    fingerprint); `dataset_path`/`dataset_fingerprint` are the base dataset's."""
    prepared = {None: (dataset_path, dataset_fingerprint), **(datasets or {})}
    runs = []
    configs = spec.training_configs()
    for model in spec.base_models:
        family = model_family(model_paths[model.name], model.config)
        for dataset_name, dataset in spec.dataset_specs():
            if dataset_name not in prepared:
                raise ValueError(f"dataset variant {dataset_name!r} was not prepared (tasks.preflight)")
            path, fingerprint = prepared[dataset_name]
            for config in configs:
                runs += _config_runs(spec, model, model_paths[model.name], family, config,
                                     (dataset_name, dataset, path, fingerprint))
    return runs


def planned_runs(spec: SweepSpec, inputs: PreparedInputs) -> list[TrainingRunSpec]:
    """The sweep's training runs from its prepared inputs (every dataset variant included)."""
    return training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint,
                         inputs.dataset_variants)


def _config_runs(spec: SweepSpec, model: BaseModelSpec, model_path: str, family: ModelFamily,
                 config: TrainingConfig, data: tuple[str | None, DatasetSpec, str, str]) -> list[TrainingRunSpec]:
    """The runs of one configuration on one base model and dataset: one per rank."""
    t = config.training
    dataset_name, dataset, dataset_path, dataset_fingerprint = data
    if t.clip_skip != 1 and family == "sdxl":  # A1111 ignores it for SDXL, sd-scripts refuses it
        raise ValueError(f"training.clip_skip {t.clip_skip} does not apply to SDXL base model {model.name!r} "
                         "(it always uses the penultimate layers); allowed: 1")
    preset, settings = preset_settings(t, family)
    runs = []
    for rank in settings["ranks"]:
        fields = dict(
            base_model=model,
            base_model_path=model_path,
            dataset=dataset,
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
            variant=config.variant,
            dataset_name=dataset_name,
        )
        run_id = f"{model.name}-r{rank}-{run_content_id(fields, model, dataset)}"
        runs.append(TrainingRunSpec(run_id=run_id, sweep_id=spec.sweep_id(), sweep_root=str(sweep_root(spec)),
                                    **fields))
    return runs


# Never in a run's id: where things are, and records whose effect is already in other fields (the
# memory preset's choice is in resolution, batch size and the rest).
# `variant` and `dataset_name` are labels: the options they stand for are in the id.
NOT_IN_RUN_ID = ("base_model_path", "dataset_path", "memory_preset", "cache_dir", "variant", "dataset_name",
                 "stop_at")
# Options added after the first runs were trained, with the values that reproduce runs from before
# them (tasks.sweep.ids.with_later_options). `cache`: a disk cache gives the bits an in-memory one
# does; "off" draws the VAE samples per step, so it enters the id.
TRAINING_OPTIONS = ("lora_dropout", "lr_scheduler", "lr_warmup_steps", "lr_cycles", "gradient_accumulation_steps",
                    "min_snr_gamma", "noise_offset", "mixed_precision", "gradient_checkpointing", "optimizer",
                    "train_text_encoder", "text_encoder_lr", "validation_images", "buckets", "max_grad_norm",
                    "clip_skip", "prior_preservation", "network", "lokr_factor", "conv_rank", "conv_alpha",
                    "dora_axis")
# `dora_axis`: DoRA trained per output row before the option existed, so "output" keeps those ids and "input"
# (the default, a different network) enters the id; other types carry None.
LATER_RUN_OPTIONS: dict[str, tuple[object, ...]] = {
    **{name: (TrainingRunSpec.model_fields[name].default,) for name in TRAINING_OPTIONS},
    "cache": ("disk", "memory"), "dora_axis": (None, "output"),
}
LATER_DATASET_OPTIONS: dict[str, tuple[object, ...]] = {"caption_dropout": (0.0,), "shuffle_tags": (False,),
                                                        "keep_tokens": (0,)}
# The same for render jobs and images. "auto" precision and no extra LoRAs are the jobs from before
# those options; an image rendered in fp32 keeps its id whether "auto" or "fp32" asked for it.
# A1111 prompt syntax only changes prompts that use it or may be longer than one chunk; for the rest
# it is "plain", what every image was before the option existed (prompt_syntax_in_effect).
# Clip skip 1 and no caption prompts: every job and image before those options. A caption prompt's image
# names its source image too, so one caption on two images (or equal to a spec prompt) stays two images.
LATER_RENDER_OPTIONS: dict[str, tuple[object, ...]] = {"extra_loras": ([],), "precision": ("auto",),
                                                       "prompt_syntax": ("plain",), "clip_skip": ([1],),
                                                       "caption_prompts": ([],)}


def run_content_id(fields: dict[str, object], model: BaseModelSpec, dataset: DatasetSpec) -> str:
    """A run's id: every field that shapes its weights; the base model by path, the dataset by content."""
    identity = {k: v for k, v in fields.items() if k not in NOT_IN_RUN_ID and k not in LATER_RUN_OPTIONS}
    identity = with_later_options(identity, {k: fields[k] for k in LATER_RUN_OPTIONS}, LATER_RUN_OPTIONS)
    identity["base_model"] = model.model_dump(exclude={"name"})
    # Caption options change what training sees without changing the files the fingerprint hashes.
    caption_options = {k: getattr(dataset, k) for k in LATER_DATASET_OPTIONS}
    identity["dataset"] = with_later_options({"trigger_word": dataset.trigger_word}, caption_options,
                                             LATER_DATASET_OPTIONS)
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
    options["dora_axis"] = t.dora_axis if t.network == "dora" else None
    options["cache"] = t.cache
    options["cache_dir"] = (t.cache_dir or str(Path(output_dir) / "cache")) if t.cache == "disk" else None
    if t.buckets:  # the step only matters (and only enters the id) with buckets on
        options["bucket_step"] = t.bucket_step
    return options


def render_jobs(
    spec: SweepSpec, model_paths: dict[str, str], checkpoints: list[CheckpointRef], runs: list[TrainingRunSpec],
    dataset_path: str, caption_prompts: tuple[CaptionPrompt, ...] = (),
) -> list[RenderJobSpec]:
    """A baseline job per base model, then one job per checkpoint of that model's runs (+ caption prompts)."""
    model_of_run = {r.run_id: r.base_model for r in runs}
    run_of = {r.run_id: r for r in runs}
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
            identity = with_later_options(identity, render_later_options(spec, extras, caption_prompts),
                                          LATER_RENDER_OPTIONS)
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
                    prompt_syntax=r.prompt_syntax, clip_skips=r.clip_skip, caption_prompts=caption_prompts,
                    **grid,
                    # a checkpoint is scored against the dataset variant its run trained on
                    **(scoring if ckpt is None else {**scoring, "dataset_path": run_of[ckpt.run_id].dataset_path,
                                                     "dataset": run_of[ckpt.run_id].dataset}),
                )
            )
    return jobs


def render_later_options(spec: SweepSpec, extras: tuple[ExtraLoraRef, ...],
                         caption_prompts: tuple[CaptionPrompt, ...]) -> dict[str, object]:
    """A render job's options added after the first jobs were rendered (LATER_RENDER_OPTIONS)."""
    r = spec.render
    texts = [*spec.prompt_texts(), *(c.prompt for c in caption_prompts)]
    return {"extra_loras": [x.model_dump(exclude={"path"}) for x in extras], "precision": r.precision,
            "prompt_syntax": prompt_syntax_in_effect(r.prompt_syntax, texts, r.negative_prompt),
            "clip_skip": list(r.clip_skip),
            "caption_prompts": [c.model_dump(exclude={"source_path"}) for c in caption_prompts]}


def extra_lora_refs(spec: SweepSpec) -> tuple[ExtraLoraRef, ...]:
    """The spec's extra LoRAs with their files' sha256 (a changed file re-renders, a moved one does not)."""
    return tuple(ExtraLoraRef(name=x.name, path=x.path, weight=x.weight, sha256=file_sha256(x.path))
                 for x in spec.render.extra_loras)
