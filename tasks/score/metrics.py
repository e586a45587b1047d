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
from PIL import Image, ImageOps
from scipy.ndimage import laplace, uniform_filter
from skimage.feature import canny, local_binary_pattern

ANALYSIS_SIZE = 128  # px, square, for SSIM to training images, diversity and style statistics
SSIM_WINDOW = 7  # skimage's default window; _ssim reproduces structural_similarity()
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; stored as this finite cap instead
MEMORIZATION_SSIM_THRESHOLD = 0.9  # nearest-training SSIM above this sets memorized_flag
COLOR_BINS_PER_CHANNEL = 8  # joint RGB histogram: 8**3 = 512 bins
LBP_POINTS, LBP_RADIUS = 8, 1  # "uniform" LBP codes: LBP_POINTS + 2 = 10 bins
CANNY_SIGMA = 1.0

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



def as_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Return `image` as HxWx3 uint8, converting float [0, 1]; raise on any other shape, dtype or range."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"{name}: expected shape HxWx3 (RGB), got {image.shape}")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"{name}: expected dtype uint8 or float in [0, 1], got {image.dtype}")
    lo, hi = float(np.min(image)), float(np.max(image))
    if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
        raise ValueError(f"{name}: float values must lie in [0, 1], got range [{lo:.3g}, {hi:.3g}]"
                         " (for [-1, 1] tensors pass (x + 1) / 2)")
    return np.round(image * 255.0).astype(np.uint8)


def _analysis_view(image: np.ndarray) -> Image.Image:
    """Centre crop to square (as training data is) and resize to ANALYSIS_SIZE px."""
    size = (ANALYSIS_SIZE, ANALYSIS_SIZE)
    return ImageOps.fit(Image.fromarray(image), size, method=Image.Resampling.BILINEAR)


def _analysis_gray(image: np.ndarray) -> np.ndarray:
    """Luma in [0, 1] of the analysis view, the input to every SSIM here."""
    return np.asarray(_analysis_view(image).convert("L"), dtype=np.float64) / 255.0


def _color_hist(rgb: np.ndarray) -> np.ndarray:
    """Joint RGB histogram with COLOR_BINS_PER_CHANNEL bins per channel, summing to 1."""
    q = (rgb // (256 // COLOR_BINS_PER_CHANNEL)).astype(np.int64)
    codes = (q[..., 0] * COLOR_BINS_PER_CHANNEL + q[..., 1]) * COLOR_BINS_PER_CHANNEL + q[..., 2]
    return np.bincount(codes.ravel(), minlength=COLOR_BINS_PER_CHANNEL**3) / codes.size


def _chi2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chi-square distance 0.5 * sum((a-b)^2 / (a+b)) over the last axis; in [0, 1] for histograms."""
    total = a + b
    diff2 = (a - b) ** 2
    return 0.5 * np.sum(np.divide(diff2, total, out=np.zeros_like(total), where=total > 0), axis=-1)


_SSIM_SIZE = (1, SSIM_WINDOW, SSIM_WINDOW)  # filter each image of an N x H x W stack separately
_COV_NORM = SSIM_WINDOW**2 / (SSIM_WINDOW**2 - 1)  # sample covariance, as skimage


@dataclass(frozen=True)
class SsimStats:
    """Gray images (N x H x W, [0, 1]) with their 7x7 window means and variances, reused per pair."""

    gray: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    @classmethod
    def of(cls, grays: np.ndarray) -> SsimStats:
        """Window statistics as skimage computes them (uniform window, sample variance)."""
        mean = uniform_filter(grays, size=_SSIM_SIZE)
        var = _COV_NORM * (uniform_filter(grays * grays, size=_SSIM_SIZE) - mean * mean)
        return cls(grays, mean, var)

    def __getitem__(self, index: slice) -> SsimStats:
        """The statistics of a slice of the images."""
        return SsimStats(self.gray[index], self.mean[index], self.var[index])


def _ssim(x: SsimStats, ys: SsimStats) -> np.ndarray:
    """Mean SSIM (data range 1) of the single image in x against each image in ys.

    Same value as skimage's structural_similarity defaults; vectorised, with each side's
    statistics precomputed, so a render meets a whole training set in one pass.
    """
    cov = _COV_NORM * (uniform_filter(x.gray * ys.gray, size=_SSIM_SIZE) - x.mean * ys.mean)
    c1, c2 = 0.01**2, 0.03**2
    inner = (slice(None),) + (slice((SSIM_WINDOW - 1) // 2, -((SSIM_WINDOW - 1) // 2)),) * 2
    ux, uy, vx, vy, cov = x.mean[inner], ys.mean[inner], x.var[inner], ys.var[inner], cov[inner]
    s = ((2 * ux * uy + c1) * (2 * cov + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2))


@dataclass(frozen=True)
class ImageFeatures:
    """What one image contributes to comparisons, all at ANALYSIS_SIZE px."""

    gray: np.ndarray  # float64 in [0, 1], for SSIM
    color_hist: np.ndarray  # joint RGB histogram, sums to 1
    lbp_hist: np.ndarray  # uniform LBP code histogram, sums to 1
    edge_density: float  # fraction of Canny edge pixels

    @classmethod
    def of(cls, image: np.ndarray) -> ImageFeatures:
        """Centre-crop to square, resize to ANALYSIS_SIZE and compute every statistic once."""
        small = _analysis_view(image)
        gray_u8 = np.asarray(small.convert("L"))  # LBP wants integer input
        gray = gray_u8.astype(np.float64) / 255.0
        lbp = local_binary_pattern(gray_u8, LBP_POINTS, LBP_RADIUS, method="uniform").astype(np.int64)
        lbp_hist = np.bincount(lbp.ravel(), minlength=LBP_POINTS + 2) / lbp.size
        edges = float(np.mean(canny(gray, sigma=CANNY_SIGMA)))
        return cls(gray, _color_hist(np.asarray(small)), lbp_hist, edges)


@dataclass(frozen=True)
class TrainingSetFeatures:
    """Features of every training image, computed once per sweep and compared with each render."""

    ids: tuple[str, ...]
    ssim: SsimStats  # N gray images at ANALYSIS_SIZE
    color_hists: np.ndarray  # N x bins
    lbp_hists: np.ndarray  # N x bins
    edge_densities: np.ndarray  # N

    @classmethod
    def from_images(cls, ids: Sequence[str], images: Sequence[np.ndarray]) -> TrainingSetFeatures:
        """Check ids and images (every problem at once), then extract features of each image."""
        problems = []
        if len(ids) != len(images):
            problems.append(f"got {len(ids)} ids but {len(images)} images")
        if not ids:
            problems.append("training set is empty")
        dupes = sorted({i for i in ids if list(ids).count(i) > 1})
        if dupes:
            problems.append(f"duplicate ids {dupes}")
        checked = []
        for image_id, image in zip(ids, images):
            try:
                checked.append(as_rgb_uint8(image, f"training image {image_id!r}"))
            except (TypeError, ValueError) as err:
                problems.append(str(err))
        if problems:
            raise ValueError("training set: " + "; ".join(problems))
        feats = [ImageFeatures.of(image) for image in checked]
        return cls(ids=tuple(ids), ssim=SsimStats.of(np.stack([f.gray for f in feats])),
                   color_hists=np.stack([f.color_hist for f in feats]),
                   lbp_hists=np.stack([f.lbp_hist for f in feats]),
                   edge_densities=np.array([f.edge_density for f in feats]))


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
        similarity, image_id = self.nearest(-_ssim(self.ssim, self.training.ssim))
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
        return {"color": _chi2(f.color_hist[None], t.color_hists),
                "lbp": _chi2(f.lbp_hist[None], t.lbp_hists),
                "edge": np.abs(f.edge_density - t.edge_densities)}



def psnr_db(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of two same-shape uint8 images over all RGB values, capped at PSNR_CAP_DB."""
    if image.shape != reference.shape:
        raise ValueError(f"PSNR needs equal shapes, got {image.shape} and {reference.shape}")
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10.0 * np.log10(255.0**2 / mse))


def laplacian_variance(image: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of luma in [0, 1] at native size: low means blurry."""
    luma = np.asarray(Image.fromarray(as_rgb_uint8(image)).convert("L"), dtype=np.float64) / 255.0
    return float(np.var(laplace(luma)))


def edge_density(image: np.ndarray) -> float:
    """Fraction of pixels on Canny edges at ANALYSIS_SIZE (so renders and training images compare)."""
    return ImageFeatures.of(as_rgb_uint8(image)).edge_density


@metric("ssim_vs_baseline", higher_is_better=True, needs=("baseline",))
def _ssim_vs_baseline(inputs: MetricInputs) -> MetricResult:
    """SSIM to the no-LoRA render at ANALYSIS_SIZE: 1 means the LoRA left the composition alone."""
    assert inputs.baseline is not None
    value = _ssim(inputs.ssim, SsimStats.of(_analysis_gray(inputs.baseline)[None]))[0]
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
    grays = np.stack([_analysis_gray(as_rgb_uint8(im, f"images[{i}]")) for i, im in enumerate(images)])
    stats = SsimStats.of(grays)
    dissimilarities = [1.0 - _ssim(stats[i:i + 1], stats[i + 1:]) for i in range(len(grays) - 1)]
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
