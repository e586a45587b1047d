"""Expand a SweepSpec into the training runs and render jobs it implies, each with a content id.

Ids hash everything that determines an artifact, so re-running a sweep finds finished work and
a changed spec gets new ids only where something really changed.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tasks.model_family import ModelFamily, model_family
from tasks.spec import BaseModelSpec, DatasetSpec, SweepSpec, TrainingSpec, content_id
from tasks.training_presets import MemoryPreset, memory_preset


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


def sweep_root(spec: SweepSpec) -> Path:
    return Path(spec.output_dir) / spec.name


def training_runs(
    spec: SweepSpec, model_paths: dict[str, str], dataset_path: str, dataset_fingerprint: str
) -> list[TrainingRunSpec]:
    """One run per (base model x rank), in spec order; a memory preset plans for each model's family."""
    t = spec.training
    runs = []
    for model in spec.base_models:
        preset, settings = preset_settings(t, model_family(model_paths[model.name], model.config))
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
                checkpoint_steps=tuple(sorted(t.checkpoint_steps)),
                learning_rate=t.learning_rate,
                batch_size=settings["batch_size"],
                resolution=settings["resolution"],
                seed=t.seed,
                target_modules=t.lora_targets(),
                **_training_options(t, settings, preset, spec.output_dir),
            )
            identity = {k: v for k, v in fields.items() if k not in NOT_IN_ID
                        and not (k in OPTION_DEFAULTS and v == OPTION_DEFAULTS[k])}
            if t.cache == "off":  # encoding every step draws the VAE samples differently; disk and memory agree
                identity["cache"] = "off"
            identity["base_model"] = model.model_dump(exclude={"name"})
            identity["dataset"] = {"trigger_word": spec.dataset.trigger_word}
            run_id = f"{model.name}-r{rank}-{content_id(_jsonable(identity), 10)}"
            runs.append(
                TrainingRunSpec(run_id=run_id, sweep_id=spec.sweep_id(), sweep_root=str(sweep_root(spec)), **fields)
            )
    return runs


# Options added after the first runs were trained: left out of a run's id while at their default, so
# those runs keep their ids and finished checkpoints. The memory preset is never in the id: it is a
# record, its effect is already in resolution, batch size and the rest. Neither is where encodings
# are cached: a disk cache gives the bits an in-memory one does.
OPTION_DEFAULTS = {name: TrainingRunSpec.model_fields[name].default for name in (
    "lora_dropout", "lr_scheduler", "lr_warmup_steps", "lr_cycles", "gradient_accumulation_steps", "min_snr_gamma",
    "noise_offset", "mixed_precision", "gradient_checkpointing", "optimizer", "train_text_encoder",
    "text_encoder_lr", "validation_images", "buckets")}
NOT_IN_ID = ("base_model_path", "dataset_path", "memory_preset", "cache", "cache_dir")


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
    options: dict[str, object] = {name: getattr(t, name) for name in OPTION_DEFAULTS}
    options["mixed_precision"] = settings["mixed_precision"]
    options["gradient_checkpointing"] = settings["gradient_checkpointing"]
    options["text_encoder_lr"] = (t.text_encoder_lr or t.learning_rate) if t.train_text_encoder else None
    options["memory_preset"] = preset
    options["cache"] = t.cache
    options["cache_dir"] = (t.cache_dir or str(Path(output_dir) / "cache")) if t.cache == "disk" else None
    if t.buckets:  # the step only matters (and only enters the id) with buckets on
        options["bucket_step"] = t.bucket_step
    return options


def checkpoint_id(run_id: str, step: int) -> str:
    return f"{run_id}-s{step}"


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
            if extras:  # only when present, so jobs planned before extra LoRAs existed keep their ids
                identity["extra_loras"] = [x.model_dump(exclude={"path"}) for x in extras]
            if r.precision != "auto":  # likewise: "auto" jobs keep the ids they had before precision existed
                identity["precision"] = r.precision
            tag = f"{model.name}-baseline" if ckpt is None else ckpt.checkpoint_id
            render_id = f"{tag}-{content_id(_jsonable(identity), 10)}"
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
                    **grid,
                    **scoring,
                )
            )
    return jobs


def extra_lora_refs(spec: SweepSpec) -> tuple[ExtraLoraRef, ...]:
    """The spec's extra LoRAs with their files' sha256 (a changed file re-renders, a moved one does not)."""
    return tuple(ExtraLoraRef(name=x.name, path=x.path, weight=x.weight, sha256=file_sha256(x.path))
                 for x in spec.render.extra_loras)


def file_sha256(path: str) -> str:
    file = Path(path)
    stat = file.stat()
    return _sha256(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    """Cached on (path, size, mtime): planning runs several times per sweep and LoRA files can be large."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _jsonable(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
