"""The sweep spec: one typed, frozen description of a whole experiment, validated at the boundary.

A TOML file is parsed into `SweepSpec`; unknown keys and bad values are all reported at once,
each naming the field, the bad value and what is allowed. Relative paths resolve against the
spec file's folder. `builtin:` paths name assets the project builds in code (the tiny model,
the demo dataset).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-sd15", "tiny-sd15-world", "tiny-sdxl")
BUILTIN_DATASETS = ("demo-world",)
TRIGGER_PLACEHOLDER = "{trigger}"

PositiveInt = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class SpecError(ValueError):
    """Every problem found in a sweep spec, one per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the sweep spec:\n{lines}")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _unique(values: tuple, field: str) -> tuple:
    dupes = sorted({repr(v) for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"{field} must not repeat values; repeated: {', '.join(dupes)}")
    return values


class DatasetSpec(_Frozen):
    """Training images and where their captions come from (`source`), or `builtin:demo-world`.

    Sources: `sidecar` (img.png + img.txt), `kohya` (`N_name/` repeat folders), `metadata_jsonl`
    (`file_name` + `text`), `csv` (image column + caption column or template, optional row filter).
    """

    path: str
    trigger_word: str = Field(min_length=1)
    source: Literal["sidecar", "kohya", "metadata_jsonl", "csv"] = "sidecar"
    caption_extension: str = Field(default=".txt", pattern=r"^\.[A-Za-z0-9]+$")
    min_images: PositiveInt = 1
    metadata_file: str = Field(default="metadata.jsonl", min_length=1)
    csv_file: str | None = Field(default=None, min_length=1)
    csv_image_column: str = Field(default="image", min_length=1)
    csv_caption_column: str | None = Field(default=None, min_length=1)
    caption_template: str | None = Field(default=None, min_length=1)
    csv_filter: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    prefix_trigger: bool = False
    caption_dropout: float = Field(default=0.0, ge=0.0, le=1.0)
    shuffle_tags: bool = False
    keep_tokens: int = Field(default=0, ge=0)
    captioner: str | None = None

    @field_validator("path")
    @classmethod
    def _builtin_known(cls, value: str) -> str:
        _check_builtin(value, BUILTIN_DATASETS)
        return value

    @field_validator("trigger_word")
    @classmethod
    def _one_word(cls, value: str) -> str:
        if any(ch.isspace() for ch in value):
            raise ValueError("the trigger word must be one token without spaces, e.g. 'zqx' or 'sks_style'")
        return value

    @field_validator("captioner")
    @classmethod
    def _known_captioner(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("blip:") and len(value) > len("blip:")):
            raise ValueError("allowed: 'blip:<local folder with a BLIP captioning model>'; nothing is downloaded")
        return value

    @model_validator(mode="after")
    def _source_fields_agree(self) -> DatasetSpec:
        problems = []
        if self.path.startswith(BUILTIN_PREFIX) and self.source != "sidecar":
            problems.append(f"{self.path} is a sidecar dataset; source {self.source!r} needs a folder path")
        csv_only = {"csv_file": self.csv_file, "csv_caption_column": self.csv_caption_column,
                    "caption_template": self.caption_template, "csv_filter": self.csv_filter or None}
        if self.source != "csv":
            problems += [f"{k} = {v!r} is only used with source = 'csv' (source is {self.source!r})"
                         for k, v in csv_only.items() if v is not None]
        elif self.csv_file is None:
            problems.append("source = 'csv' needs csv_file = '<file relative to dataset.path>'")
        if self.source == "csv" and (self.csv_caption_column is None) == (self.caption_template is None):
            problems.append("source = 'csv' needs exactly one of csv_caption_column or caption_template, "
                            "e.g. caption_template = 'a painting by {artist}, {title}'")
        if self.keep_tokens and not self.shuffle_tags:
            problems.append(f"keep_tokens = {self.keep_tokens} only applies with shuffle_tags = true")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class BaseModelSpec(_Frozen):
    """A base model: a diffusers folder, a single .safetensors file (+ config folder), or builtin."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    path: str
    config: str | None = None

    @field_validator("path")
    @classmethod
    def _builtin_known(cls, value: str) -> str:
        _check_builtin(value, BUILTIN_MODELS)
        return value


class TrainingSpec(_Frozen):
    """LoRA training axes (ranks) and shared settings; one run per (base model x rank).

    Every option defaults to the plain loop: attention LoRA, constant learning rate, AdamW, fp32.
    `memory_preset_gib` fills resolution, batch_size, gradient_checkpointing, mixed_precision and
    ranks for a GPU of that size and each base model's family (tasks.training_presets), when the
    plan knows the family (tasks.plan); a key set in the spec wins. `ranks` may then be left out.
    """

    ranks: tuple[PositiveInt, ...] | None = Field(default=None, min_length=1)  # None: the memory preset's rank
    alpha: float | None = Field(default=None, gt=0, description="LoRA alpha; None means alpha = rank")
    max_steps: PositiveInt
    checkpoint_steps: tuple[PositiveInt, ...] = Field(min_length=1)
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
    # 4: the smallest sd15 tier; an SDXL base model needs 10 (checked with the base models, tasks.inputs)
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

    @field_validator("ranks", "checkpoint_steps")
    @classmethod
    def _no_repeats(cls, value: tuple | None, info: Any) -> tuple | None:
        return value if value is None else _unique(value, info.field_name)

    @model_validator(mode="after")
    def _options_agree(self) -> TrainingSpec:
        problems = []
        if self.ranks is None and self.memory_preset_gib is None:
            problems.append("ranks is missing; allowed: a list of LoRA ranks, or leave it out and set "
                            "memory_preset_gib (the preset then picks the rank)")
        beyond = [s for s in self.checkpoint_steps if s > self.max_steps]
        if beyond:
            problems.append(f"checkpoint_steps {beyond} exceed max_steps {self.max_steps}; "
                            f"allowed: steps from 1 to {self.max_steps}")
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
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def lora_targets(self) -> tuple[str, ...]:
        """The UNet module names that get LoRA: the explicit list, else the preset (default 'attention')."""
        from tasks.training_presets import TARGET_PRESETS

        return self.target_modules or TARGET_PRESETS[self.target_preset or "attention"]


def _sampler_choice(value: Any) -> Any:
    """A registry name, or an A1111 `{ sampler = "DPM++ 2M", schedule_type = "Karras" }` table turned into one."""
    from tasks.samplers import a1111_pair_problems, resolve_sampler

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


class ExtraLoraSpec(_Frozen):
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


class RenderSpec(_Frozen):
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

    @field_validator("seeds", "steps", "lora_weights", "cfg_scales", "prompts")
    @classmethod
    def _no_repeats(cls, value: tuple, info: Any) -> tuple:
        return _unique(value, info.field_name)

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
        _unique(tuple(x.name for x in value), "extra_loras names")
        return value

    def with_absolute_paths(self, absolute: Any) -> RenderSpec:
        """Extra LoRA paths resolved by `absolute` (relative to the spec's folder, like every spec path)."""
        extras = tuple(x.model_copy(update={"path": absolute(x.path)}) for x in self.extra_loras)
        return self.model_copy(update={"extra_loras": extras})


class MetricsSpec(_Frozen):
    """Optional metrics that need extra local weights."""

    clip_model: str | None = Field(default=None, description="local CLIP folder for CLIP scores")


class ExecutionSpec(_Frozen):
    """Where the sweep's tasks run; never changes what they compute, so it is not part of the sweep id.

    `threads` (default): the flow's own thread pool. `dask`: training and render tasks fan out
    over a Dask cluster, a LocalCluster of `n_workers` processes or the scheduler at
    `dask_address`; each task reserves one `GPU` worker resource (`gpus_per_task`).
    `train_deployment` submits every training run as a flow run of that deployment instead, so
    the work pool's workers (one per GPU machine) share the training.
    """

    runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = None
    n_workers: PositiveInt | None = Field(default=None, le=256, description="LocalCluster worker processes; default 2")
    threads_per_worker: PositiveInt = Field(default=1, le=64)
    cuda_devices: tuple[str, ...] = ()
    gpus_per_task: int = Field(default=1, ge=0, le=1, description="Dask resource GPU each train/render task holds")
    train_deployment: str | None = None
    # Threads runner: training and render tasks hold one slot of this Prefect global concurrency
    # limit while they run (one GPU: one at a time). Created on first use with `gpu_limit_slots`
    # slots (0: one per CUDA device here). Applied when CUDA is present, or always with
    # gpu_limit_on_cpu = true. "" turns it off.
    gpu_limit: str = Field(default="lora-sweep-gpu", pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._-]*$")
    gpu_limit_slots: int = Field(default=0, ge=0, le=64)
    gpu_limit_on_cpu: bool = False

    @field_validator("dask_address")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(tcp|tls|ucx|inproc)://[^\s/:]+(:\d+)?", value):
            raise ValueError("allowed: a Dask scheduler address such as 'tcp://scheduler-host:8786' "
                             "(tcp://, tls://, ucx:// or inproc://)")
        return value

    @field_validator("cuda_devices")
    @classmethod
    def _device_ids(cls, value: tuple[str, ...], info: Any) -> tuple[str, ...]:
        bad = [d for d in value if not re.fullmatch(r"\d+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+", d)]
        if bad:
            raise ValueError(f"{bad} are not CUDA device ids; allowed: what CUDA_VISIBLE_DEVICES takes, "
                             "e.g. ['0', '1'] or GPU UUIDs 'GPU-8f6c...'")
        return _unique(value, info.field_name)

    @field_validator("train_deployment")
    @classmethod
    def _deployment_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^/\s]+/[^/\s]+", value):
            raise ValueError("allowed: '<flow name>/<deployment name>', e.g. 'lora-train/train-run'")
        return value

    @model_validator(mode="after")
    def _fields_agree(self) -> ExecutionSpec:
        problems = []
        dask_only = ("dask_address", "n_workers", "threads_per_worker", "cuda_devices", "gpus_per_task")
        if self.runner == "threads":
            problems += [f"{k} = {getattr(self, k)!r} is only used with runner = 'dask' (runner is 'threads')"
                         for k in dask_only if k in self.model_fields_set]
        elif self.dask_address is not None:
            local = [f"{k} = {getattr(self, k)!r}" for k in ("n_workers", "cuda_devices") if k in self.model_fields_set]
            if local:
                problems.append(f"{' and '.join(local)} describe the LocalCluster the flow starts without "
                                f"dask_address; with dask_address = {self.dask_address!r} start the workers yourself "
                                f"(`dask worker {self.dask_address} --resources GPU=1`)")
        if self.runner == "dask":
            problems += [f"{k} = {getattr(self, k)!r} applies to runner = 'threads'; with 'dask' each task holds "
                         "one Dask GPU resource instead (gpus_per_task)"
                         for k in ("gpu_limit", "gpu_limit_slots", "gpu_limit_on_cpu") if k in self.model_fields_set]
        if self.cuda_devices and self.n_workers is not None and self.n_workers != len(self.cuda_devices):
            problems.append(f"n_workers = {self.n_workers} but cuda_devices lists {len(self.cuda_devices)} "
                            f"device(s) {list(self.cuda_devices)}; allowed: one worker per device (omit n_workers)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def local_workers(self) -> int:
        """Worker processes of the LocalCluster the dask runner starts (one per CUDA device when listed)."""
        return len(self.cuda_devices) or self.n_workers or 2


class SweepSpec(_Frozen):
    """A whole sweep: dataset, base models, training axes and the render grid."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str = "outputs"
    dataset: DatasetSpec
    base_models: tuple[BaseModelSpec, ...] = Field(min_length=1)
    training: TrainingSpec
    render: RenderSpec
    metrics: MetricsSpec = MetricsSpec()
    execution: ExecutionSpec = ExecutionSpec()

    @field_validator("base_models")
    @classmethod
    def _unique_names(cls, value: tuple[BaseModelSpec, ...]) -> tuple[BaseModelSpec, ...]:
        _unique(tuple(m.name for m in value), "base model names")
        return value

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

    def prompt_texts(self) -> tuple[str, ...]:
        """Prompts with `{trigger}` filled in."""
        return tuple(p.replace(TRIGGER_PLACEHOLDER, self.dataset.trigger_word) for p in self.render.prompts)

    def sweep_id(self) -> str:
        return content_id(self.model_dump(mode="json", exclude={"execution"}))


def _absolute_captioner(value: str | None, absolute) -> str | None:
    """`blip:relative/folder` resolves against the spec's folder like every other path."""
    if value is None or ":" not in value:
        return value
    kind, _, path = value.partition(":")
    return f"{kind}:{absolute(path)}"


def _check_builtin(value: str, allowed: tuple[str, ...]) -> None:
    if value.startswith(BUILTIN_PREFIX) and value[len(BUILTIN_PREFIX) :] not in allowed:
        names = ", ".join(BUILTIN_PREFIX + a for a in allowed)
        raise ValueError(f"unknown builtin {value!r}; allowed builtins: {names}")


def content_id(payload: Any, length: int = 16) -> str:
    """A stable id: sha256 of canonical JSON. Same inputs give the same id, so finished work is found."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key (value {err['input']!r}); check the spelling against the documented keys"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if isinstance(value, dict):  # a whole-section check: the message names the values
        return f"{loc}: {msg}"
    return f"{loc}: got {value!r}; {msg}"


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> SweepSpec:
    """Validate a parsed TOML dict, raising SpecError with every problem at once."""
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        # pydantic also reports a list as too short once a bad item is dropped; the item's error says it all.
        item_locs = {e["loc"][:-1] for e in errors if e["loc"] and isinstance(e["loc"][-1], int)}
        errors = [e for e in errors if not (e["type"] == "too_short" and e["loc"] in item_locs)]
        raise SpecError(source, [_format_error(e) for e in errors]) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep TOML file; relative paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [f"spec file {str(path)!r} does not exist; pass the path of a .toml sweep spec"])
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SpecError(str(path), [f"not valid TOML: {err}"]) from None
    spec = parse_spec(data, str(path))
    return resolve_paths(spec, path.parent.resolve())


def resolve_paths(spec: SweepSpec, base: Path) -> SweepSpec:
    """Make dataset, model and output paths absolute (builtins stay symbolic)."""

    def absolute(p: str | None) -> str | None:
        if p is None or p.startswith(BUILTIN_PREFIX):
            return p
        return str((base / Path(p).expanduser()).resolve())

    models = tuple(m.model_copy(update={"path": absolute(m.path), "config": absolute(m.config)}) for m in spec.base_models)
    metrics = spec.metrics.model_copy(update={"clip_model": absolute(spec.metrics.clip_model)})
    return spec.model_copy(
        update={
            "metrics": metrics,
            "output_dir": absolute(spec.output_dir),
            "training": spec.training.model_copy(update={"cache_dir": absolute(spec.training.cache_dir)}),
            "dataset": spec.dataset.model_copy(update={"path": absolute(spec.dataset.path),
                                                       "captioner": _absolute_captioner(spec.dataset.captioner, absolute)}),
            "base_models": models,
            "render": spec.render.with_absolute_paths(absolute),
        }
    )
