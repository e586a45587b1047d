"""The sweep spec: one typed, frozen description of a whole experiment, validated at the boundary.

A TOML file is parsed into `SweepSpec`; unknown keys and bad values are all reported at once,
each naming the field, the bad value and what is allowed. Relative paths resolve against the
spec file's folder. `builtin:` paths name assets the project builds in code (the tiny model,
the demo dataset).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-sd15",)
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
    """LoRA training axes (ranks) and shared settings; one run per (base model x rank)."""

    ranks: tuple[PositiveInt, ...] = Field(min_length=1)
    alpha: float | None = Field(default=None, gt=0, description="LoRA alpha; None means alpha = rank")
    max_steps: PositiveInt
    checkpoint_steps: tuple[PositiveInt, ...] = Field(min_length=1)
    learning_rate: float = Field(gt=0, le=1)
    batch_size: PositiveInt = 1
    resolution: int = Field(default=512, ge=8, le=4096, multiple_of=8)
    seed: Seed = 0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    @field_validator("ranks", "checkpoint_steps")
    @classmethod
    def _no_repeats(cls, value: tuple, info: Any) -> tuple:
        return _unique(value, info.field_name)

    @model_validator(mode="after")
    def _checkpoints_within_max(self) -> TrainingSpec:
        beyond = [s for s in self.checkpoint_steps if s > self.max_steps]
        if beyond:
            raise ValueError(
                f"checkpoint_steps {beyond} exceed max_steps {self.max_steps}; "
                f"allowed: steps from 1 to {self.max_steps}"
            )
        return self


class RenderSpec(_Frozen):
    """The fixed-seed image grid rendered for every checkpoint."""

    prompts: tuple[Annotated[str, Field(min_length=1)], ...] = Field(min_length=1)
    negative_prompt: str = ""
    seeds: tuple[Seed, ...] = Field(min_length=1)
    samplers: tuple[str, ...] = Field(min_length=1)
    steps: tuple[Annotated[int, Field(ge=1, le=500)], ...] = Field(min_length=1)
    lora_weights: tuple[Annotated[float, Field(ge=-4, le=4)], ...] = Field(min_length=1)
    cfg_scales: tuple[Annotated[float, Field(ge=0, le=50)], ...] = (7.0,)
    width: int = Field(default=512, ge=8, le=4096, multiple_of=8)
    height: int = Field(default=512, ge=8, le=4096, multiple_of=8)

    @field_validator("seeds", "samplers", "steps", "lora_weights", "cfg_scales", "prompts")
    @classmethod
    def _no_repeats(cls, value: tuple, info: Any) -> tuple:
        return _unique(value, info.field_name)

    @field_validator("samplers")
    @classmethod
    def _known_samplers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from tasks.samplers import resolve_sampler

        problems = []
        for name in value:
            try:
                resolve_sampler(name)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("; ".join(problems))
        return value


class MetricsSpec(_Frozen):
    """Optional metrics that need extra local weights."""

    clip_model: str | None = Field(default=None, description="local CLIP folder for CLIP scores")


class SweepSpec(_Frozen):
    """A whole sweep: dataset, base models, training axes and the render grid."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str = "outputs"
    dataset: DatasetSpec
    base_models: tuple[BaseModelSpec, ...] = Field(min_length=1)
    training: TrainingSpec
    render: RenderSpec
    metrics: MetricsSpec = MetricsSpec()

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
        return content_id(self.model_dump(mode="json"))


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
            "dataset": spec.dataset.model_copy(update={"path": absolute(spec.dataset.path),
                                                       "captioner": _absolute_captioner(spec.dataset.captioner, absolute)}),
            "base_models": models,
        }
    )
