"""The spec's `[search]` section: a full grid (the default) or successive halving over the same runs.

With `strategy = "halving"` every run trains to the first rung (a checkpoint step), runs are compared by
`metric` there, the best `keep` go on to the next rung and the rest stop (pruned, their checkpoints kept);
the survivors of the last rung train to max_steps (flows/halving.py). `keep` is a fraction kept at every
rung (0.5, or "1/3" for an exact third; floor(n x fraction) of n runs, as ASHA keeps floor(n / eta)), a
count kept at the one rung, or a list of counts, one per rung. Torch-free: the spec validates it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, field_validator, model_validator

from tasks.sweep.axes import run_count
from tasks.sweep.fields import Frozen, PositiveInt, unique_values

if TYPE_CHECKING:
    from tasks.sweep.spec import SweepSpec

VALIDATION_METRIC = "validation_loss"
# Every metric a halving sweep can rank by: name -> (higher is better, what it needs). The image metrics are
# tasks.score's (a test keeps this list equal to its registry; importing it here would load scikit-image
# into every spec check). "lora images": scored on rendered LoRA images, so the rung's grid renders first.
METRICS: dict[str, tuple[bool, str]] = {
    VALIDATION_METRIC: (False, "validation images"),
    "concept_score": (True, "demo world"),
    "clip_text_image_score": (True, "clip model"),
    "clip_similarity_to_training": (False, "clip model"),
    "caption_ssim": (True, "caption prompts"),
    "caption_color_chi2": (False, "caption prompts"),
    "caption_texture_lbp_chi2": (False, "caption prompts"),
    "caption_clip_similarity": (True, "caption prompts and clip model"),
    **{name: (higher, "lora images") for name, higher in (
        ("ssim_vs_baseline", True), ("psnr_vs_baseline_db", True), ("nearest_training_ssim", False),
        ("memorized_flag", False), ("style_color_chi2", False), ("style_texture_lbp_chi2", False),
        ("style_edge_density_gap_fraction", False), ("style_distance", False), ("sharpness_laplacian_var", True),
        ("edge_density_fraction", True), ("seed_diversity_1_minus_ssim", True))},
}
KEEP_ALLOWED = ("a fraction kept at every rung between 0 and 1 (0.5, or a string such as \"1/3\"), a count "
                "of runs kept (an integer), or a list of counts, one per rung")


def _keep_choice(value: Any) -> Any:
    """`keep` as written: a fraction (number or "a/b" string), a count, or a list of counts; else a ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"keep = {value!r}; allowed: {KEEP_ALLOWED}")  # noqa: TRY004 (pydantic reports ValueErrors)
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            raise ValueError(f"keep = {list(value)!r}; allowed: a list of counts of at least 1, one per rung")
        return tuple(value)
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"keep = {value} keeps nothing; allowed: {KEEP_ALLOWED}")
        return value
    fraction = keep_fraction(value)
    if fraction is None or not 0 < fraction < 1:
        raise ValueError(f"keep = {value!r}; allowed: {KEEP_ALLOWED}")
    return value


def keep_fraction(value: Any) -> Fraction | None:
    """A float or "a/b" string as an exact fraction; None for anything else."""
    try:
        if isinstance(value, float):
            return Fraction(str(value))
        if isinstance(value, str) and value.strip():
            return Fraction(value.strip())
    except (ValueError, ZeroDivisionError):
        return None
    return None


Keep = Annotated[int | float | str | tuple[int, ...], BeforeValidator(_keep_choice)]


class SearchSpec(Frozen):
    """`[search]`: how the sweep spends its training steps. "grid" trains every run to max_steps (the default);
    "halving" stops the worse runs at each rung (successive halving, as ASHA and Hyperband's brackets)."""

    strategy: Literal["grid", "halving"] = "grid"
    rungs: tuple[PositiveInt, ...] = ()  # checkpoint steps where runs are compared, increasing
    keep: Keep = "1/3"
    metric: str | None = None  # a name in METRICS
    direction: Literal["maximize", "minimize"] | None = None  # None: the metric's own direction

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        unique_values(value, "search.rungs")
        if list(value) != sorted(value):
            raise ValueError(f"search.rungs {list(value)} are not increasing; allowed: checkpoint steps in the "
                             "order training reaches them")
        return value

    @model_validator(mode="after")
    def _fields_agree(self) -> SearchSpec:
        problems = []
        if self.strategy == "grid":
            # values, not fields_set: a dumped spec (spec.json) re-read carries every default explicitly
            given = [k for k in ("rungs", "keep", "metric", "direction")
                     if getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True)]
            if given:
                problems.append(f"search.{', search.'.join(given)} only apply to strategy = 'halving' (strategy is "
                                "'grid', which trains every run to max_steps)")
        else:
            if not self.rungs:
                problems.append("search.rungs is missing; allowed: a list of checkpoint steps below max_steps where "
                                "runs are compared, e.g. rungs = [50, 100]")
            if self.metric is None:
                problems.append(f"search.metric is missing; allowed: {', '.join(METRICS)}")
            if isinstance(self.keep, tuple) and self.rungs and len(self.keep) != len(self.rungs):
                problems.append(f"search.keep {list(self.keep)} has {len(self.keep)} counts for {len(self.rungs)} "
                                "rungs; allowed: one count per rung")
        if self.metric is not None and self.metric not in METRICS:
            problems.append(f"search.metric {self.metric!r} is not a metric; allowed: {', '.join(METRICS)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def higher_is_better(self) -> bool:
        if self.direction is not None:
            return self.direction == "maximize"
        return METRICS[self.metric or VALIDATION_METRIC][0]

    def renders_rungs(self) -> bool:
        """Whether the metric is scored on images, so each rung's checkpoints render before the decision."""
        return self.metric is not None and self.metric != VALIDATION_METRIC

    def kept(self, competitors: int, rung: int) -> int:
        """How many of `competitors` runs the rung (0-based) keeps, as written (may be 0 or all of them)."""
        if isinstance(self.keep, tuple):
            return min(self.keep[rung], competitors)
        if isinstance(self.keep, int):
            return min(self.keep, competitors)
        return math.floor(competitors * keep_fraction(self.keep))

    def schedule(self, runs: int) -> list[int]:
        """Runs that reach each rung and the final step: [runs, kept at rung 1, kept at rung 2, ...]."""
        counts = [runs]
        for rung in range(len(self.rungs)):
            counts.append(self.kept(counts[-1], rung))
        return counts


def search_problems(spec: SweepSpec) -> list[str]:
    """A halving search checked against the spec before work: rungs are checkpoint steps of every run below its
    max_steps, `keep` keeps neither nothing nor everything at any rung, the metric's inputs are there."""
    search = spec.search
    if search.strategy != "halving" or not search.rungs or search.metric is None:
        return []
    runs = run_count(spec.training_configs(), len(spec.base_models), max(1, len(spec.datasets)))
    problems = []
    for t in (config.training for config in spec.training_configs()):  # one message per distinct step list
        steps = t.resolved_checkpoint_steps()
        missing = [r for r in search.rungs if r not in steps]
        if missing:
            problems.append(f"search.rungs {missing} are not checkpoint steps; allowed: steps from {list(steps)} "
                            "(a rung resumes from the checkpoint saved there)")
        beyond = [r for r in search.rungs if r >= t.max_steps]
        if beyond:
            problems.append(f"search.rungs {beyond} are not below max_steps {t.max_steps}; allowed: steps below it "
                            "(the runs left after the last rung are compared at max_steps)")
    problems = list(dict.fromkeys(problems))
    problems += _keep_problems(search, runs)
    return problems + _metric_problems(spec)


def _keep_problems(search: SearchSpec, runs: int) -> list[str]:
    counts = search.schedule(runs)
    path = " -> ".join(map(str, counts))
    for rung, (before, after) in enumerate(itertools.pairwise(counts)):
        where = f"rung {rung + 1} (step {search.rungs[rung]})"
        if before <= 1:
            return [(f"search.keep {_shown(search.keep)} leaves {before} run at {where}: nothing to compare (runs "
                     f"reaching each rung: {path}); allowed: fewer rungs, a larger keep or more runs")]
        if after == 0 or after >= before:
            what = "nothing" if after == 0 else "everything"
            return [(f"search.keep {_shown(search.keep)} keeps {what} at {where}: {after} of {before} runs; allowed: "
                     f"at least 1 and fewer than {before} (runs reaching each rung: {path})")]
    return []


def _metric_problems(spec: SweepSpec) -> list[str]:
    metric = spec.search.metric
    needs = METRICS[metric][1]
    problems = []
    if needs == "validation images":
        without = [dict(c.values) or "the [training] section" for c in spec.training_configs()
                   if c.training.validation_images == 0]
        if without:
            problems.append(f"search.metric {metric!r} needs training.validation_images above 0 (held-out images "
                            f"the validation loss is measured on); 0 in {', '.join(map(str, without))}")
        return problems
    if not [w for w in spec.render.lora_weights if w != 0.0]:
        problems.append(f"search.metric {metric!r} is scored on LoRA images, but render.lora_weights "
                        f"{list(spec.render.lora_weights)} has no weight other than 0; allowed: add a weight such as 1.0")
    if needs == "demo world" and spec.dataset.path != "builtin:demo-world":
        problems.append(f"search.metric {metric!r} is the demo world's ground truth; dataset.path is "
                        f"{spec.dataset.path!r}; allowed: dataset.path = 'builtin:demo-world', or another metric")
    if "clip model" in needs and spec.metrics.clip_model is None:
        problems.append(f"search.metric {metric!r} needs a CLIP model; allowed: set metrics.clip_model to a local CLIP "
                        "folder, or another metric")
    if "caption prompts" in needs and spec.render.caption_prompts is None:
        problems.append(f"search.metric {metric!r} scores caption prompts; allowed: set render.caption_prompts, or "
                        "another metric")
    return problems


def _shown(keep: object) -> str:
    return repr(list(keep)) if isinstance(keep, tuple) else repr(keep)


def halving_steps(counts: Sequence[int], rungs: Sequence[int], max_steps: int) -> int:
    """Training steps a halving schedule spends: each run trains up to the rung where it stops."""
    ends = [*rungs, max_steps]
    return sum((counts[i] - (counts[i + 1] if i + 1 < len(counts) else 0)) * ends[i] for i in range(len(counts)))
