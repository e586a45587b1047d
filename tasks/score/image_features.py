"""Image features the metrics compare: analysis crops, colour and texture histograms, SSIM statistics.

Image convention: HxWx3 RGB, uint8 (0-255) or float in [0, 1]; anything else is rejected at the
boundary (`as_rgb_uint8`). SSIM and the style statistics work on grayscale/RGB at ANALYSIS_SIZE px
after a centre crop to square, the crop training images get; PSNR and sharpness at native size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from scipy.ndimage import laplace, uniform_filter
from skimage.feature import canny, local_binary_pattern

ANALYSIS_SIZE = 128  # px, square, for SSIM to training images, diversity and style statistics
SSIM_WINDOW = 7  # skimage's default window; ssim_values reproduces structural_similarity()
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; stored as this finite cap instead
COLOR_BINS_PER_CHANNEL = 8  # joint RGB histogram: 8**3 = 512 bins
LBP_POINTS, LBP_RADIUS = 8, 1  # "uniform" LBP codes: LBP_POINTS + 2 = 10 bins
CANNY_SIGMA = 1.0


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


def analysis_view(image: np.ndarray) -> Image.Image:
    """Centre crop to square (as training data is) and resize to ANALYSIS_SIZE px."""
    size = (ANALYSIS_SIZE, ANALYSIS_SIZE)
    return ImageOps.fit(Image.fromarray(image), size, method=Image.Resampling.BILINEAR)


def analysis_gray(image: np.ndarray) -> np.ndarray:
    """Luma in [0, 1] of the analysis view, the input to every SSIM here."""
    return np.asarray(analysis_view(image).convert("L"), dtype=np.float64) / 255.0


def color_hist(rgb: np.ndarray) -> np.ndarray:
    """Joint RGB histogram with COLOR_BINS_PER_CHANNEL bins per channel, summing to 1."""
    q = (rgb // (256 // COLOR_BINS_PER_CHANNEL)).astype(np.int64)
    codes = (q[..., 0] * COLOR_BINS_PER_CHANNEL + q[..., 1]) * COLOR_BINS_PER_CHANNEL + q[..., 2]
    return np.bincount(codes.ravel(), minlength=COLOR_BINS_PER_CHANNEL**3) / codes.size


def chi2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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


def ssim_values(x: SsimStats, ys: SsimStats) -> np.ndarray:
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
        small = analysis_view(image)
        gray_u8 = np.asarray(small.convert("L"))  # LBP wants integer input
        gray = gray_u8.astype(np.float64) / 255.0
        lbp = local_binary_pattern(gray_u8, LBP_POINTS, LBP_RADIUS, method="uniform").astype(np.int64)
        lbp_hist = np.bincount(lbp.ravel(), minlength=LBP_POINTS + 2) / lbp.size
        edges = float(np.mean(canny(gray, sigma=CANNY_SIGMA)))
        return cls(gray, color_hist(np.asarray(small)), lbp_hist, edges)


def training_id_problems(ids: Sequence[str], images: Sequence[np.ndarray]) -> list[str]:
    """A training set's id problems: count mismatch, empty set and duplicate ids."""
    problems = []
    if len(ids) != len(images):
        problems.append(f"got {len(ids)} ids but {len(images)} images")
    if not ids:
        problems.append("training set is empty")
    dupes = sorted({i for i in ids if list(ids).count(i) > 1})
    if dupes:
        problems.append(f"duplicate ids {dupes}")
    return problems


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
        problems = training_id_problems(ids, images)
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
