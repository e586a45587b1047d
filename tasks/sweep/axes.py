"""Training axes, named training variants and dataset variants: how one spec asks for many runs.

In `[training]` any option may be a list (`learning_rate = [1e-4, 3e-4]`, `alpha = [1, 8]`); an
option that is itself a list (`target_modules`, `checkpoint_steps`) is an axis when given a list of
lists. `[[training.variants]]` names combinations that are not a product (`name` plus overrides),
and `[[datasets]]` names variants of `[dataset]` (other captions, repeats, caption options). The
sweep trains base models x datasets x variants x axes x ranks. Everything here is torch-free: the
spec validates it and the plan expands it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError, model_validator

from tasks.sweep.fields import Frozen

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# Options that say where things are kept, not how a LoRA is trained: never an axis.
NOT_AXES = frozenset({"cache", "cache_dir", "ranks"})
DEFAULT_MAX_RUNS = 100


class Variant(Frozen):
    """A named set of overrides: `[[training.variants]]` or `[[datasets]]` (written flat in TOML)."""

    name: str = Field(min_length=1, pattern=NAME_PATTERN)
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flat_table(cls, data: Any) -> Any:
        """`{name = "fast", learning_rate = 1e-3}` as TOML writes it -> name + overrides."""
        if isinstance(data, dict) and "overrides" not in data:
            return {"name": data.get("name"), "overrides": {k: v for k, v in data.items() if k != "name"}}
        return data


@dataclass(frozen=True)
class TrainingConfig:
    """One point of the training space: the variant it came from, the axis values and the resolved options."""

    variant: str | None
    values: Mapping[str, Any]  # axis and variant values that differ between configs, for labels
    training: Any  # a validated TrainingSpec


def is_list_field(model: type, key: str) -> bool:
    """Whether the model's field holds a list itself (so a list of lists is an axis of it)."""
    annotation = str(model.model_fields[key].annotation)
    return "tuple" in annotation or "dict" in annotation


def split_axes(training: dict[str, Any], model: type) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The `[training]` table as the base options (each axis at its first value) and the axes."""
    base, axes = dict(training), {}
    for key, value in training.items():
        if key in NOT_AXES or key not in model.model_fields or not isinstance(value, list):
            continue
        if is_list_field(model, key) and not (value and all(isinstance(v, list) for v in value)):
            continue  # a plain list for a list option: one value, not an axis
        if not value:
            raise ValueError(f"training.{key} = []: an empty list; allowed: one value, or a list of values to sweep")
        axes[key] = value
        base[key] = value[0]
    return base, axes


def axis_problems(axes: Mapping[str, Iterable[Any]], base_set: dict[str, Any], model: type) -> list[str]:
    """Each axis value checked alone against the base options: wrong types, out of range, repeats."""
    problems = []
    for key, values in axes.items():
        values = list(values)
        if len(values) == 1:
            continue
        repeated = sorted({repr(v) for v in values if values.count(v) > 1})
        if repeated:
            problems.append(f"training.{key} = {values!r} repeats {', '.join(repeated)}; allowed: distinct values")
        for index, value in enumerate(values):
            if index == 0:
                continue  # the base options carry the first value: its problems are reported there
            problems += [f"training.{key}[{index}] = {value!r}: {p}"
                         for p in field_problems(model, {**base_set, key: value}, key)]
    return problems


def variant_problems(kind: str, variants: tuple[Variant, ...], model: type, base_set: dict[str, Any],
                     axes: Mapping[str, Any] = {}, fixed: tuple[str, ...] = ()) -> list[str]:
    """Unknown options, repeated names, options that are also axes or may not vary, invalid values."""
    problems = []
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"{kind} names must be unique; repeated: {', '.join(map(repr, repeated))}")
    allowed = sorted(k for k in model.model_fields if k not in fixed and k not in NOT_AXES - {"ranks"})
    for index, variant in enumerate(variants):
        where = f"{kind}[{index}] ({variant.name!r})"
        pinned = sorted(k for k in variant.overrides if k in fixed)
        if pinned:
            problems.append(f"{where}: {', '.join(pinned)} cannot differ between {kind}; every prompt and id uses "
                            "the one in the base section")
            continue
        unknown = sorted(k for k in variant.overrides if k not in model.model_fields)
        if unknown:
            problems.append(f"{where}: unknown option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
            continue
        both = sorted(set(variant.overrides) & set(axes))
        if both:
            problems.append(f"{where}: {', '.join(both)} is also a training axis; set it in the axis or in the "
                            "variants, not both")
            continue
        problems += [f"{where}: {p}" for p in field_problems(model, {**base_set, **variant.overrides})]
    return problems


def field_problems(model: type, data: dict[str, Any], only: str | None = None) -> list[str]:
    """Validation problems of `model(**data)` as short texts; with `only`, just those of that field."""
    try:
        model.model_validate(data)
    except ValidationError as err:
        texts = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            if only is not None and e["loc"] and e["loc"][0] != only:
                continue
            msg = e["msg"].removeprefix("Value error, ")
            texts.append(msg if not loc or loc == only else f"{loc}: {msg}")
        return texts
    return []


def combinations(training: Any, axes: Mapping[str, tuple[Any, ...]],
                 variants: tuple[Variant, ...]) -> Iterator[tuple[Variant | None, dict[str, Any]]]:
    """Each point of the training space in spec order: (its variant or None, the values it sets), variants
    (or the base alone) x the axes' product."""
    keys = list(axes)
    for variant in variants or (None,):
        overrides = variant.overrides if variant else {}
        for combo in itertools.product(*(axes[k] for k in keys)):
            yield variant, {**overrides, **dict(zip(keys, combo))}


def training_configs(training: Any, axes: Mapping[str, tuple[Any, ...]],
                     variants: tuple[Variant, ...]) -> list[TrainingConfig]:
    """Every configuration the spec asks for, in spec order: variants (or the base alone) x the axes' product."""
    base_set = training.model_dump(include=training.model_fields_set)
    return [TrainingConfig(variant.name if variant else None, values,
                           type(training).model_validate({**base_set, **values}) if values else training)
            for variant, values in combinations(training, axes, variants)]


def combination_problems(training: Any, axes: Mapping[str, tuple[Any, ...]], variants: tuple[Variant, ...]) -> list[str]:
    """Options that are valid alone but disagree in a combination (e.g. lr_warmup_steps beyond a max_steps value)."""
    base_set = training.model_dump(include=training.model_fields_set)
    problems: list[str] = []
    for variant, values in combinations(training, axes, variants):
        label = ", ".join(f"{k} = {v!r}" for k, v in values.items())
        where = f"training ({'variant ' + repr(variant.name) + ': ' if variant else ''}{label})"
        problems += [f"{where}: {p}" for p in field_problems(type(training), {**base_set, **values})
                     if f"{where}: {p}" not in problems]
    return problems


def run_count(configs: list[TrainingConfig], models: int, datasets: int) -> int:
    """Runs the product trains: each config's ranks (one when a memory preset picks it) per model and dataset."""
    return models * datasets * sum(len(c.training.ranks or (1,)) for c in configs)


def product_text(models: int, datasets: int, axes: Mapping[str, tuple[Any, ...]], variants: int,
                 ranks: int | None) -> str:
    """`2 base models x 3 learning_rate x 2 ranks`: how the run count comes about."""
    parts = [f"{models} base model{'s' * (models != 1)}"]
    if datasets > 1:
        parts.append(f"{datasets} datasets")
    if variants:
        parts.append(f"{variants} variants")
    parts += [f"{len(v)} {k}" for k, v in axes.items() if len(v) > 1]
    if ranks:
        parts.append(f"{ranks} rank{'s' * (ranks != 1)}")
    return " x ".join(parts)


def product_size(axes: Mapping[str, tuple[Any, ...]]) -> int:
    return math.prod(len(v) for v in axes.values())


def sweep_problems(spec: Any, training_model: type, dataset_model: type) -> list[str]:
    """A sweep spec's axes, variants and dataset variants checked alone, then every combination, and the
    number of runs against `max_runs` (counted before the product is enumerated: it may be huge)."""
    t_set = spec.training.model_dump(include=spec.training.model_fields_set)
    d_set = spec.dataset.model_dump(include=spec.dataset.model_fields_set)
    problems = axis_problems(spec.training_axes, t_set, training_model)
    problems += variant_problems("training.variants", spec.training_variants, training_model, t_set,
                                 spec.training_axes)
    problems += variant_problems("datasets", spec.datasets, dataset_model, d_set, fixed=("trigger_word",))
    if problems:
        return problems
    models, datasets = len(spec.base_models), max(1, len(spec.datasets))
    varied_ranks = any("ranks" in v.overrides for v in spec.training_variants)
    ranks = len(spec.training.ranks) if spec.training.ranks and not varied_ranks else None
    combos = product_size(spec.training_axes) * max(1, len(spec.training_variants)) * models * datasets
    if combos > spec.max_runs:
        return [_too_many(spec, combos * (ranks or 1), ranks)]
    problems = combination_problems(spec.training, spec.training_axes, spec.training_variants)
    if problems:
        return problems
    runs = run_count(spec.training_configs(), models, datasets)
    return [_too_many(spec, runs, ranks)] if runs > spec.max_runs else []


def _too_many(spec: Any, runs: int, ranks: int | None) -> str:
    how = product_text(len(spec.base_models), len(spec.datasets), spec.training_axes, len(spec.training_variants),
                       ranks)
    return (f"the spec trains {how} = {runs} runs, over max_runs = {spec.max_runs}; allowed: at most max_runs "
            "runs (raise max_runs at the top of the spec, or shrink an axis)")
