"""The sweep spec: one typed, frozen description of a whole experiment, validated at the boundary.

A TOML file is parsed into `SweepSpec`; unknown keys and bad values are all reported at once,
each naming the field, the bad value and what is allowed. Relative paths resolve against the
spec file's folder. `builtin:` paths name assets the project builds in code (the tiny model,
the demo dataset).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from tasks.sweep.axes import DEFAULT_MAX_RUNS, TrainingConfig, Variant, split_axes, sweep_problems, training_configs
from tasks.sweep.caption_prompts import caption_choice
from tasks.sweep.dataset_spec import DatasetSpec
from tasks.sweep.execution_spec import ExecutionSpec
from tasks.sweep.fields import Frozen, PositiveInt, Seed, check_builtin, unique_values
from tasks.sweep.ids import content_id
from tasks.sweep.presets import TARGET_PRESETS, conv_problems, network_problems
from tasks.sweep.prior_preservation import PriorPreservationSpec, class_prompt_problems
from tasks.sweep.prompt_syntax import parse_prompt_attention
from tasks.sweep.sampler_names import a1111_pair_problems, resolve_sampler
from tasks.sweep.search_spec import SearchSpec, search_problems

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-sd15", "tiny-sd15-world", "tiny-sdxl")
TRIGGER_PLACEHOLDER = "{trigger}"

class BaseModelSpec(Frozen):
    """A base model: a diffusers folder, a single .safetensors file (+ config folder), or builtin."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    path: str
    config: str | None = None

    @field_validator("path")
    @classmethod
    def _builtin_known(cls, value: str) -> str:
        check_builtin(value, BUILTIN_MODELS)
        return value


class TrainingSpec(Frozen):
    """One training configuration: ranks and every option (a list given for an option in TOML becomes an
    axis, tasks.sweep.axes); one run per base model x rank of each configuration.

    Every option defaults to the plain loop: attention LoRA, constant learning rate, AdamW, fp32.
    `memory_preset_gib` fills resolution, batch_size, gradient_checkpointing, mixed_precision and
    ranks for a GPU of that size and each base model's family (tasks.sweep.presets), when the
    plan knows the family (tasks.sweep.plan); a key set in the spec wins. `ranks` may then be left out.
    """

    ranks: tuple[PositiveInt, ...] | None = Field(default=None, min_length=1)  # None: the memory preset's rank
    alpha: float | None = Field(default=None, gt=0, description="LoRA alpha; None means alpha = rank")
    max_steps: PositiveInt
    checkpoint_steps: tuple[PositiveInt, ...] | None = Field(default=None, min_length=1)
    # Save every N steps and at max_steps; with checkpoint_steps too, the union (resolved_checkpoint_steps).
    checkpoint_every: PositiveInt | None = None
    learning_rate: float = Field(gt=0, le=1)
    batch_size: PositiveInt = 1
    resolution: int = Field(default=512, ge=8, le=4096, multiple_of=8)
    seed: Seed = 0
    target_modules: tuple[Annotated[str, Field(min_length=1)], ...] | None = Field(default=None, min_length=1)
    target_preset: Literal["attention", "attention+ff", "locon"] | None = None
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"] = "constant"
    lr_warmup_steps: int = Field(default=0, ge=0)
    lr_cycles: PositiveInt = 1
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    min_snr_gamma: float | None = Field(default=None, gt=0)
    noise_offset: float = Field(default=0.0, ge=0, le=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    train_text_encoder: bool = False
    text_encoder_lr: float | None = Field(default=None, gt=0, le=1)
    # 4: the smallest sd15 tier; an SDXL base model needs 10 (checked with the base models, tasks.preflight)
    memory_preset_gib: float | None = Field(default=None, ge=4, le=4096)
    validation_images: int = Field(default=0, ge=0, le=10_000)  # held out; validation loss at each checkpoint
    # VAE latents and text-encoder outputs: "disk" keeps them under cache_dir keyed by content hash
    # (reused by later runs, sweeps and resumes), "memory" encodes once per run, "off" encodes every step.
    cache: Literal["disk", "memory", "off"] = "disk"
    cache_dir: str | None = Field(default=None, min_length=1)  # default: <output_dir>/cache
    # Aspect-ratio buckets: each image keeps its shape, cropped to the nearest of a set of sizes of
    # about resolution^2 pixels (sides multiples of bucket_step, 1:2 to 2:1); a batch holds one bucket.
    buckets: bool = False
    bucket_step: int = Field(default=64, ge=8, le=512, multiple_of=8)
    # Clip the LoRA gradients' total norm (after fp16 unscaling); None: no clipping. kohya's default is 1.0.
    max_grad_norm: float | None = Field(default=None, gt=0)
    # A1111's "Clip skip": N conditions on the text encoder's N-th layer from the end (1: the last). SD1.x only.
    clip_skip: int = Field(default=1, ge=1, le=12)
    # DreamBooth prior preservation: class images by the base model, trained beside the instance images.
    prior_preservation: PriorPreservationSpec | None = None
    # The adapter type: LoRA, DoRA, LoHa or LoKr (tasks.lora.networks; sweep.presets.network_problems).
    network: Literal["lora", "dora", "loha", "lokr"] = "lora"
    lokr_factor: int = Field(default=-1, ge=-1)  # LoKr's split of each dimension; -1: near its square root
    # DoRA's learned magnitude: one per input column (what AUTOMATIC1111 and ComfyUI compute from the kohya file)
    # or one per output row (peft's use_dora, LyCORIS' wd_on_output; DoRA runs from before this option).
    dora_axis: Literal["input", "output"] = "input"
    # LoCon: the k x k convolutions' own rank and alpha (kohya's conv_dim / conv_alpha); None: the run's rank, alpha.
    conv_rank: PositiveInt | None = None
    conv_alpha: float | None = Field(default=None, gt=0)

    @field_validator("ranks", "checkpoint_steps")
    @classmethod
    def _no_repeats(cls, value: tuple | None, info: Any) -> tuple | None:
        return value if value is None else unique_values(value, info.field_name)

    @model_validator(mode="after")
    def _options_agree(self) -> TrainingSpec:
        problems = []
        if self.ranks is None and self.memory_preset_gib is None:
            problems.append("ranks is missing; allowed: a list of LoRA ranks, or leave it out and set "
                            "memory_preset_gib (the preset then picks the rank)")
        problems += self._checkpoint_problems()
        if self.target_modules is not None and self.target_preset is not None:
            problems.append(f"target_modules {list(self.target_modules)} and target_preset {self.target_preset!r} "
                            "are both set; allowed: one of them")
        if self.lr_warmup_steps > self.max_steps:
            problems.append(f"lr_warmup_steps {self.lr_warmup_steps} exceeds max_steps {self.max_steps}; "
                            f"allowed: 0 to {self.max_steps}")
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            problems.append(f"lr_warmup_steps {self.lr_warmup_steps} has no effect with lr_scheduler 'constant'; "
                            "allowed: lr_scheduler 'constant_with_warmup', 'linear', 'cosine' or "
                            "'cosine_with_restarts', or lr_warmup_steps 0")
        if self.lr_cycles != 1 and self.lr_scheduler != "cosine_with_restarts":
            problems.append(f"lr_cycles {self.lr_cycles} only applies to lr_scheduler 'cosine_with_restarts' "
                            f"(lr_scheduler is {self.lr_scheduler!r}); allowed: lr_cycles 1")
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            problems.append(f"text_encoder_lr {self.text_encoder_lr} only applies with train_text_encoder = true")
        if self.buckets and self.bucket_step > self.resolution:
            problems.append(f"bucket_step {self.bucket_step} exceeds resolution {self.resolution}; "
                            f"allowed: a multiple of 8 up to {self.resolution}")
        if self.cache_dir is not None and self.cache != "disk":
            problems.append(f"cache_dir {self.cache_dir!r} only applies with cache = 'disk' (cache is {self.cache!r})")
        problems += network_problems(self.network, self.lokr_factor, self.lora_dropout)
        if self.dora_axis != "input" and self.network != "dora":
            problems.append(f"dora_axis {self.dora_axis!r} only applies with network = 'dora' (network is "
                            f"{self.network!r}); allowed: 'input' (the default) or 'output', with network = 'dora'")
        problems += conv_problems(self.conv_rank, self.conv_alpha, self.lora_targets())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _checkpoint_problems(self) -> list[str]:
        problems = []
        if self.checkpoint_steps is None and self.checkpoint_every is None:
            problems.append("checkpoint_steps is missing; allowed: a list of steps from 1 to max_steps, "
                            "or checkpoint_every = N (every N steps and at max_steps)")
        beyond = [s for s in self.checkpoint_steps or () if s > self.max_steps]
        if beyond:
            problems.append(f"checkpoint_steps {beyond} exceed max_steps {self.max_steps}; "
                            f"allowed: steps from 1 to {self.max_steps}")
        if self.checkpoint_every is not None and self.checkpoint_every > self.max_steps:
            problems.append(f"checkpoint_every {self.checkpoint_every} exceeds max_steps {self.max_steps}; "
                            f"allowed: 1 to {self.max_steps}")
        return problems

    def resolved_checkpoint_steps(self) -> tuple[int, ...]:
        """The sorted steps that save a LoRA: checkpoint_steps united with every `checkpoint_every`-th step
        and max_steps (so the final weights are always saved, as kohya's save_every_n_steps does)."""
        every = self.checkpoint_every
        periodic = {*range(every, self.max_steps + 1, every), self.max_steps} if every else set()
        return tuple(sorted({*(self.checkpoint_steps or ()), *periodic}))

    def lora_targets(self) -> tuple[str, ...]:
        """The UNet module names that get LoRA: the explicit list, else the preset (default 'attention')."""
        return self.target_modules or TARGET_PRESETS[self.target_preset or "attention"]


def _sampler_choice(value: Any) -> Any:
    """A registry name, or an A1111 `{ sampler = "DPM++ 2M", schedule_type = "Karras" }` table turned into one."""
    if isinstance(value, str):
        resolve_sampler(value)  # its ValueError names the value, the closest name and every valid one
        return value
    if not isinstance(value, dict):
        return value  # the str check reports the wrong type
    shown = "{ " + ", ".join(f"{k} = {v!r}" for k, v in value.items()) + " }"
    allowed = "{ sampler = '<A1111 sampler>', schedule_type = '<A1111 schedule type>' } (schedule_type optional)"
    problems = [f"unknown key {k!r}" for k in value if k not in ("sampler", "schedule_type")]
    sampler, schedule = value.get("sampler"), value.get("schedule_type", "Automatic")
    if not isinstance(sampler, str) or not isinstance(schedule, str):
        problems.append("sampler is required and both values must be strings")
    if problems:
        raise ValueError(f"{shown}: {'; '.join(problems)}; allowed: {allowed}")
    problems = a1111_pair_problems(sampler, schedule)
    if problems:
        raise ValueError(f"{shown}: {'; '.join(problems)}")
    return resolve_sampler(sampler, schedule).name


# Normalised at validation, so everything downstream sees registry names only.
SamplerChoice = Annotated[str, BeforeValidator(_sampler_choice)]


class ExtraLoraSpec(Frozen):
    """A LoRA stacked at a fixed weight on every image, ours and the baseline (e.g. a downloaded style LoRA).

    `name` is what A1111 writes in `<lora:NAME:WEIGHT>`; `path` a local kohya or diffusers `.safetensors` file.
    """

    name: str
    path: str = Field(min_length=1)
    weight: float = Field(default=1.0, ge=-4, le=4)

    @field_validator("name")
    @classmethod
    def _a1111_name(cls, value: str) -> str:
        if not value or value != value.strip() or re.search(r"[:,<>\n\r]", value):
            raise ValueError("allowed: a name as in A1111's <lora:NAME:WEIGHT>, without : , < > or newlines "
                             "and without surrounding spaces, e.g. 'film_grain_v2'")
        return value


class RenderSpec(Frozen):
    """The fixed-seed image grid rendered for every checkpoint, with any extra LoRAs stacked on every image."""

    prompts: tuple[Annotated[str, Field(min_length=1)], ...] = Field(min_length=1)
    negative_prompt: str = ""
    seeds: tuple[Seed, ...] = Field(min_length=1)
    samplers: tuple[SamplerChoice, ...] = Field(min_length=1)
    steps: tuple[Annotated[int, Field(ge=1, le=500)], ...] = Field(min_length=1)
    lora_weights: tuple[Annotated[float, Field(ge=-4, le=4)], ...] = Field(min_length=1)
    cfg_scales: tuple[Annotated[float, Field(ge=0, le=50)], ...] = (7.0,)
    width: int = Field(default=512, ge=8, le=4096, multiple_of=8)
    height: int = Field(default=512, ge=8, le=4096, multiple_of=8)
    extra_loras: tuple[ExtraLoraSpec, ...] = ()
    # Weights and activations while rendering: "auto" is fp16 on a CUDA GPU, fp32 on the CPU.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # "a1111": (x), [x], (x:1.3), BREAK and prompts longer than 75 tokens (in 75-token chunks) as in
    # AUTOMATIC1111; "plain": the text as written, cut at CLIP's 77 tokens (diffusers' own behaviour).
    prompt_syntax: Literal["a1111", "plain"] = "a1111"
    # A1111's "Clip skip", an axis: the text encoder's N-th layer from the end (1: the last); SD1.x only.
    clip_skip: tuple[Annotated[int, Field(ge=1, le=12)], ...] = Field(default=(1,), min_length=1)
    # Training captions as prompts, each scored against its own image: "all" or N (tasks.sweep.caption_prompts).
    caption_prompts: Annotated[Literal["all"] | int | None, BeforeValidator(caption_choice)] = None

    @field_validator("seeds", "steps", "lora_weights", "cfg_scales", "prompts", "clip_skip")
    @classmethod
    def _no_repeats(cls, value: tuple, info: Any) -> tuple:
        return unique_values(value, info.field_name)

    @field_validator("samplers")
    @classmethod
    def _no_repeated_samplers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        dupes = sorted({repr(v) for v in value if value.count(v) > 1})
        if dupes:
            raise ValueError(f"samplers must not repeat a sampler; repeated: {', '.join(dupes)} "
                             "(an A1111 { sampler, schedule_type } table counts as the registry name it resolves to)")
        return value

    @field_validator("extra_loras")
    @classmethod
    def _unique_extra_names(cls, value: tuple[ExtraLoraSpec, ...]) -> tuple[ExtraLoraSpec, ...]:
        unique_values(tuple(x.name for x in value), "extra_loras names")
        return value

    @model_validator(mode="after")
    def _prompts_parse(self) -> RenderSpec:
        if self.prompt_syntax == "a1111":
            problems = []
            for field, text in [*((f"prompts[{i}]", p) for i, p in enumerate(self.prompts)),
                                ("negative_prompt", self.negative_prompt)]:
                try:
                    parse_prompt_attention(text)
                except ValueError as err:
                    problems.append(f"{field}: {err}; allowed: (text:1.3) with a number, or prompt_syntax = 'plain'")
            if problems:
                raise ValueError("; ".join(problems))
        return self

    def with_absolute_paths(self, absolute: Any) -> RenderSpec:
        """Extra LoRA paths resolved by `absolute` (relative to the spec's folder, like every spec path)."""
        extras = tuple(x.model_copy(update={"path": absolute(x.path)}) for x in self.extra_loras)
        return self.model_copy(update={"extra_loras": extras})


class MetricsSpec(Frozen):
    """Optional metrics that need extra local weights."""

    clip_model: str | None = Field(default=None, description="local CLIP folder for CLIP scores")


class SweepSpec(Frozen):
    """A whole sweep: dataset(s), base models, training axes and variants, and the render grid.

    `[training]` options given as lists become `training_axes` (the training section keeps each at
    its first value) and `[[training.variants]]` becomes `training_variants` (tasks.sweep.axes).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str = "outputs"
    dataset: DatasetSpec
    datasets: tuple[Variant, ...] = ()  # named variants of `dataset`: other captions, repeats, caption options
    base_models: tuple[BaseModelSpec, ...] = Field(min_length=1)
    training: TrainingSpec
    training_axes: dict[str, tuple[Any, ...]] = Field(default_factory=dict)
    training_variants: tuple[Variant, ...] = ()
    max_runs: PositiveInt = DEFAULT_MAX_RUNS  # a product of axes above it is refused with its counts
    render: RenderSpec
    metrics: MetricsSpec = MetricsSpec()
    execution: ExecutionSpec = ExecutionSpec()
    search: SearchSpec = SearchSpec()  # grid (every run to max_steps) or successive halving (search_spec.py)

    @model_validator(mode="before")
    @classmethod
    def _split_training(cls, data: Any) -> Any:
        """Lists in `[training]` -> training_axes; `[[training.variants]]` -> training_variants."""
        if not isinstance(data, dict) or not isinstance(data.get("training"), dict):
            return data
        base, axes = split_axes(data["training"], TrainingSpec)
        variants = base.pop("variants", None)
        data = {**data, "training": base}
        if axes:
            data["training_axes"] = {**data.get("training_axes", {}), **axes}
        if variants is not None:
            data["training_variants"] = variants
        return data

    @field_validator("base_models")
    @classmethod
    def _unique_names(cls, value: tuple[BaseModelSpec, ...]) -> tuple[BaseModelSpec, ...]:
        unique_values(tuple(m.name for m in value), "base model names")
        return value

    @model_validator(mode="after")
    def _axes_valid(self) -> SweepSpec:
        """Every axis value, variant and dataset variant checked, and the product counted against max_runs,
        before anything is planned (tasks.sweep.axes.sweep_problems)."""
        problems = sweep_problems(self, TrainingSpec, DatasetSpec)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _search_valid(self) -> SweepSpec:
        """A halving search's rungs, keep and metric against the runs (after the axes: it counts them)."""
        if problems := search_problems(self):
            raise ValueError("\n".join(problems))
        return self

    def training_configs(self) -> list[TrainingConfig]:
        """Every training configuration: variants (or the base) x the axes' product, in spec order."""
        return training_configs(self.training, self.training_axes, self.training_variants)

    def dataset_specs(self) -> tuple[tuple[str | None, DatasetSpec], ...]:
        """(name, dataset) per dataset variant; `(None, dataset)` when the spec names none."""
        if not self.datasets:
            return ((None, self.dataset),)
        base = self.dataset.model_dump(include=self.dataset.model_fields_set)
        return tuple((v.name, DatasetSpec.model_validate({**base, **v.overrides})) for v in self.datasets)

    @model_validator(mode="after")
    def _prompts_use_trigger(self) -> SweepSpec:
        trigger = self.dataset.trigger_word
        missing = [p for p in self.render.prompts if trigger not in p and TRIGGER_PLACEHOLDER not in p]
        if missing:
            raise ValueError(
                f"render.prompts {missing} use neither the trigger word {trigger!r} nor "
                f"{TRIGGER_PLACEHOLDER}; every prompt must invoke the trained concept"
            )
        return self

    @model_validator(mode="after")
    def _class_prompt_without_trigger(self) -> SweepSpec:
        if problems := [p for c in self.training_configs()
                        for p in class_prompt_problems(c.training.prior_preservation, self.dataset.trigger_word)]:
            raise ValueError("; ".join(dict.fromkeys(problems)))
        return self

    def prompt_texts(self) -> tuple[str, ...]:
        """Prompts with `{trigger}` filled in."""
        return tuple(p.replace(TRIGGER_PLACEHOLDER, self.dataset.trigger_word) for p in self.render.prompts)

    def sweep_id(self) -> str:
        """Content id of the spec; the sections a spec without axes, variants or a run limit leaves at their
        defaults are left out, so such a spec keeps the id it had before they existed."""
        quiet = {k for k in ("datasets", "training_axes", "training_variants", "max_runs", "search")
                 if getattr(self, k) == type(self).model_fields[k].get_default(call_default_factory=True)}
        return content_id(self.model_dump(mode="json", exclude={"execution", *quiet}))
