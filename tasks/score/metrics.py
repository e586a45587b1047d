"""Per-image quality metrics for rendered LoRA samples, kept in a registry of named metrics.

Image convention: HxWx3 RGB, uint8 (0-255) or float in [0, 1]; anything else is rejected at the
boundary (`as_rgb_uint8`). Everything inside works on uint8 RGB. Every SSIM (to the baseline, to
training images, across seeds) and the style statistics use grayscale/RGB at ANALYSIS_SIZE px after
a centre crop to square, the crop training images get: sizes may differ, and it stays fast.
PSNR to the baseline and sharpness use the native resolution.

Add a metric with one decorated function:

    @metric("my_thing_fraction", higher_is_better=False, needs=("training",))
    def _my_thing(inputs: MetricInputs) -> float: ...

It may return a value or (value, reference_id). Units go in the name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, TypeVar, get_args

import numpy as np

from tasks.score.image_features import (
    ImageFeatures,
    SsimStats,
    TrainingSetFeatures,
    analysis_gray,
    as_rgb_uint8,
    chi2,
    laplacian_variance,
    psnr_db,
    ssim_values,
)

MEMORIZATION_SSIM_THRESHOLD = 0.9  # nearest-training SSIM above this sets memorized_flag

Need = Literal["baseline", "training"]
MetricResult = float | tuple[float, str | None]
F = TypeVar("F", bound=Callable[..., MetricResult])
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MetricDef:
    """A registered metric: its name (units included), direction, required inputs and function."""

    name: str
    higher_is_better: bool
    needs: tuple[str, ...]
    fn: Callable[..., MetricResult]
    description: str


@dataclass(frozen=True)
class MetricValue:
    """One row of the image_metrics table, less the sweep and image ids."""

    metric: str
    value: float
    higher_is_better: bool
    reference_id: str | None


METRICS: dict[str, MetricDef] = {}  # per-image metrics, run by compute_image_metrics
GROUP_METRICS: dict[str, MetricDef] = {}  # metrics over a group of images (needs=("group",))


def _register(registry: dict[str, MetricDef], name: str, higher_is_better: bool,
              needs: tuple[str, ...], allowed: tuple[str, ...]) -> Callable[[F], F]:
    """Validate a metric declaration (every problem at once) and return the registering decorator."""
    problems = []
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(f"name {name!r} must be snake_case ([a-z][a-z0-9_]*), with units in it")
    if name in METRICS or name in GROUP_METRICS:
        problems.append(f"name {name!r} is already registered")
    if not isinstance(higher_is_better, bool):
        problems.append(f"higher_is_better {higher_is_better!r} must be True or False")
    for need in needs:
        if need not in allowed:
            problems.append(f"needs entry {need!r} is not one of {allowed}")
    if problems:
        raise ValueError(f"metric {name!r}: " + "; ".join(problems))

    def register(fn: F) -> F:
        doc = (fn.__doc__ or "").strip().splitlines()
        registry[name] = MetricDef(name, higher_is_better, tuple(needs), fn, doc[0] if doc else "")
        return fn

    return register


def metric(name: str, *, higher_is_better: bool, needs: tuple[Need, ...] = ()) -> Callable[[F], F]:
    """Register a per-image metric `fn(inputs: MetricInputs) -> value | (value, reference_id)`."""
    return _register(METRICS, name, higher_is_better, needs, get_args(Need))


def group_metric(name: str, *, higher_is_better: bool) -> Callable[[F], F]:
    """Register a metric over a group of images `fn(images: Sequence[np.ndarray]) -> float`."""
    return _register(GROUP_METRICS, name, higher_is_better, ("group",), ("group",))


@dataclass
class MetricInputs:
    """What a metric function sees: the render, optional references, and shared work cached lazily."""

    image: np.ndarray  # uint8 HxWx3
    baseline: np.ndarray | None = None  # uint8, same shape as image
    baseline_id: str | None = None
    training: TrainingSetFeatures | None = None

    @cached_property
    def features(self) -> ImageFeatures:
        """The render's features at ANALYSIS_SIZE."""
        return ImageFeatures.of(self.image)

    @cached_property
    def ssim(self) -> SsimStats:
        """The render's SSIM window statistics at ANALYSIS_SIZE."""
        return SsimStats.of(self.features.gray[None])

    @cached_property
    def nearest_training(self) -> tuple[float, str]:
        """Highest SSIM of the render to a training image, and that image's id."""
        assert self.training is not None, "metric declared needs=('training',)"
        similarity, image_id = self.nearest(-ssim_values(self.ssim, self.training.ssim))
        return -similarity, image_id

    def nearest(self, distances: np.ndarray) -> tuple[float, str]:
        """Smallest distance to a training image and that image's id."""
        assert self.training is not None, "metric declared needs=('training',)"
        i = int(np.argmin(distances))
        return float(distances[i]), self.training.ids[i]

    @cached_property
    def style_components(self) -> dict[str, np.ndarray]:
        """Per-training-image colour, texture and edge distances, each in [0, 1]."""
        assert self.training is not None, "metric declared needs=('training',)"
        f, t = self.features, self.training
        return {"color": chi2(f.color_hist[None], t.color_hists),
                "lbp": chi2(f.lbp_hist[None], t.lbp_hists),
                "edge": np.abs(f.edge_density - t.edge_densities)}


@metric("ssim_vs_baseline", higher_is_better=True, needs=("baseline",))
def _ssim_vs_baseline(inputs: MetricInputs) -> MetricResult:
    """SSIM to the no-LoRA render at ANALYSIS_SIZE: 1 means the LoRA left the composition alone."""
    assert inputs.baseline is not None
    value = ssim_values(inputs.ssim, SsimStats.of(analysis_gray(inputs.baseline)[None]))[0]
    return float(value), inputs.baseline_id


@metric("psnr_vs_baseline_db", higher_is_better=True, needs=("baseline",))
def _psnr_vs_baseline(inputs: MetricInputs) -> MetricResult:
    """PSNR to the no-LoRA render at native size; PSNR_CAP_DB for identical images."""
    assert inputs.baseline is not None
    return psnr_db(inputs.image, inputs.baseline), inputs.baseline_id


@metric("nearest_training_ssim", higher_is_better=False, needs=("training",))
def _nearest_training_ssim(inputs: MetricInputs) -> MetricResult:
    """Highest SSIM to any training image (reference_id names it): high suggests copying."""
    return inputs.nearest_training


@metric("memorized_flag", higher_is_better=False, needs=("training",))
def _memorized_flag(inputs: MetricInputs) -> MetricResult:
    """1.0 when nearest_training_ssim > MEMORIZATION_SSIM_THRESHOLD, else 0.0."""
    similarity, image_id = inputs.nearest_training
    return float(similarity > MEMORIZATION_SSIM_THRESHOLD), image_id


@metric("style_color_chi2", higher_is_better=False, needs=("training",))
def _style_color(inputs: MetricInputs) -> MetricResult:
    """Chi-square distance of the joint RGB histogram to the closest training image's, in [0, 1]."""
    return inputs.nearest(inputs.style_components["color"])


@metric("style_texture_lbp_chi2", higher_is_better=False, needs=("training",))
def _style_texture(inputs: MetricInputs) -> MetricResult:
    """Chi-square distance of the LBP texture histogram to the closest training image's, in [0, 1]."""
    return inputs.nearest(inputs.style_components["lbp"])


@metric("style_edge_density_gap_fraction", higher_is_better=False, needs=("training",))
def _style_edges(inputs: MetricInputs) -> MetricResult:
    """Absolute edge-density difference to the closest training image, in [0, 1]."""
    return inputs.nearest(inputs.style_components["edge"])


@metric("style_distance", higher_is_better=False, needs=("training",))
def _style_distance(inputs: MetricInputs) -> MetricResult:
    """Mean of the three style distances, minimised over training images: 0 = same statistics.

    The minimum (not the distance to the set mean) so a render matching any one image of a
    varied training set scores well.
    """
    components = inputs.style_components
    return inputs.nearest((components["color"] + components["lbp"] + components["edge"]) / 3.0)


@metric("sharpness_laplacian_var", higher_is_better=True)
def _sharpness(inputs: MetricInputs) -> MetricResult:
    """Variance of the Laplacian of luma at native size; compare only renders of one resolution."""
    return laplacian_variance(inputs.image)


@metric("edge_density_fraction", higher_is_better=True)
def _edge_density(inputs: MetricInputs) -> MetricResult:
    """Fraction of Canny edge pixels at ANALYSIS_SIZE; descriptive, direction read as 'more detail'."""
    return inputs.features.edge_density


@group_metric("seed_diversity_1_minus_ssim", higher_is_better=True)
def diversity_across_seeds(images: Sequence[np.ndarray]) -> float:
    """Mean pairwise 1 - SSIM at ANALYSIS_SIZE of renders that differ only by seed: 0 = collapsed."""
    if len(images) < 2:
        raise ValueError(f"diversity needs at least 2 images, got {len(images)}")
    grays = np.stack([analysis_gray(as_rgb_uint8(im, f"images[{i}]")) for i, im in enumerate(images)])
    stats = SsimStats.of(grays)
    dissimilarities = [1.0 - ssim_values(stats[i:i + 1], stats[i + 1:]) for i in range(len(grays) - 1)]
    return float(np.mean(np.concatenate(dissimilarities)))


def compute_image_metrics(image: np.ndarray, *, baseline: np.ndarray | None,
                          training: TrainingSetFeatures | None,
                          baseline_id: str | None = None) -> list[MetricValue]:
    """Every registered metric whose inputs are present, in registration order.

    Metrics needing a missing baseline or training set are skipped, not emitted as NaN.
    `baseline_id` becomes the reference_id of the baseline metrics.
    """
    image = as_rgb_uint8(image)
    if baseline is not None:
        baseline = as_rgb_uint8(baseline, "baseline")
        if baseline.shape != image.shape:
            raise ValueError(f"baseline shape {baseline.shape} differs from image shape {image.shape}")
    inputs = MetricInputs(image, baseline, baseline_id, training)
    present = {"baseline": baseline is not None, "training": training is not None}
    return [_evaluate(m, inputs) for m in METRICS.values() if all(present[n] for n in m.needs)]


def _evaluate(definition: MetricDef, inputs: MetricInputs) -> MetricValue:
    """Run one metric and shape its result into a row; a non-finite value is a bug, so it raises."""
    result = definition.fn(inputs)
    value, reference_id = result if isinstance(result, tuple) else (result, None)
    if not np.isfinite(value):
        raise ValueError(f"metric {definition.name!r} returned {value!r}")
    return MetricValue(definition.name, float(value), definition.higher_is_better, reference_id)
