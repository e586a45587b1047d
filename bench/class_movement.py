"""How far a LoRA moves one prompt's images from the base model's, under several render settings.

The render settings separate what moves the class prompt's images in bench/prior_preservation.py: Euler a's
fresh noise every step (against its deterministic twin, Euler), the negative prompt at CFG 7 (which no
training loss anchors), and guidance itself (CFG 1 renders the class prompt's conditional prediction alone,
what the prior loss trains).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.metrics import structural_similarity

from tasks.render.samplers import make_scheduler
from tasks.score.image_features import chi2, color_hist

STEPS = 20


@dataclass(frozen=True)
class RenderSetting:
    """One way to render: sampler, CFG and negative prompt (ignored at CFG 1, where diffusers skips guidance)."""

    label: str
    sampler: str
    cfg: float
    negative: str

    def describe(self) -> str:
        negative = f"negative {self.negative!r}" if self.cfg > 1 else "no negative (CFG 1: no guidance)"
        return f"({self.label}) {self.sampler}, CFG {self.cfg:g}, {negative}"


RENDER_SETTINGS = (
    RenderSetting("a", "Euler a", 7.0, "blurry"),  # the render stage's demo settings
    RenderSetting("b", "Euler", 7.0, "blurry"),  # the same without ancestral noise
    RenderSetting("c", "Euler", 7.0, ""),  # ... and without the negative prompt
    RenderSetting("d", "Euler", 1.0, ""),  # ... and without guidance: the conditional prediction alone
)


@dataclass(frozen=True)
class Movement:
    """Images against their counterparts (same seeds) from the base model."""

    pixels: float  # mean |image - base image|, 0-255
    ssim_distance: float  # mean 1 - SSIM
    colours: float  # chi-squared distance between the two sets' pooled colour histograms
    per_seed_pixels: tuple[float, ...]  # |image - base image| of each seed, in seed order


@dataclass(frozen=True)
class SettingFigures:
    """The class prompt's movement under one render setting, for each LoRA and for unrelated base images."""

    setting: RenderSetting
    without: Movement
    with_prior: Movement
    unrelated: Movement  # the base model's images at other seeds: what "moved completely" looks like

    def seeds_moved_less(self) -> int:
        """Seeds whose image moved less with prior preservation than without."""
        return sum(w < o for w, o in zip(self.with_prior.per_seed_pixels, self.without.per_seed_pixels, strict=True))

    def paired_difference(self) -> tuple[float, float]:
        """Mean and standard error over seeds of (with - without) per-seed pixel distance."""
        diff = np.subtract(self.with_prior.per_seed_pixels, self.without.per_seed_pixels)
        return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")

    def lines(self) -> list[str]:
        rows = [f"{self.setting.describe()}",
                f"  {'':<24}{'without':>10}{'with':>10}{'unrelated':>11}"]
        for label, key, fmt in (("|pixel diff| (0-255)", "pixels", ".2f"), ("1 - SSIM", "ssim_distance", ".3f"),
                                ("colour histogram chi2", "colours", ".3f")):
            values = (getattr(m, key) for m in (self.without, self.with_prior, self.unrelated))
            rows.append(f"  {label:<24}" + "".join(f"{v:>{w}{fmt}}" for v, w in zip(values, (10, 10, 11))))
        mean, error = self.paired_difference()
        rows.append(f"  with - without per seed: {mean:+.2f} +- {error:.2f} (s.e.); seeds moved less with: "
                    f"{self.seeds_moved_less()}/{len(self.without.per_seed_pixels)}")
        return rows


def render(pipe, config: dict, prompt: str, seeds: list[int], size: int,
           setting: RenderSetting = RENDER_SETTINGS[0]) -> list[np.ndarray]:
    """`setting`'s sampler (built from the base model's scheduler `config`), 20 steps, one CPU generator per
    image (as the render stage does); uint8 arrays."""
    pipe.scheduler = make_scheduler(setting.sampler, config, seed=seeds)
    negative = [setting.negative] * len(seeds) if setting.cfg > 1 else None
    images = pipe(prompt=[prompt] * len(seeds), negative_prompt=negative, num_inference_steps=STEPS,
                  guidance_scale=setting.cfg, width=size, height=size,
                  generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds]).images
    return [np.asarray(image) for image in images]


def movement(images: list[np.ndarray], base: list[np.ndarray]) -> Movement:
    """How far `images` are from `base`, seed by seed and as pooled colours."""
    pixels = pixel_distances(images, base)
    ssim = [1 - structural_similarity(a, b, channel_axis=2, data_range=255) for a, b in zip(images, base, strict=True)]
    return Movement(float(np.mean(pixels)), float(np.mean(ssim)),
                    float(chi2(pooled_colours(images), pooled_colours(base))), tuple(pixels))


def pixel_distances(images: list[np.ndarray], others: list[np.ndarray]) -> list[float]:
    """Mean absolute difference (0-255) of each image from its counterpart."""
    return [float(np.abs(a.astype(float) - b.astype(float)).mean()) for a, b in zip(images, others, strict=True)]


def pooled_colours(images: list[np.ndarray]) -> np.ndarray:
    """The mean colour histogram of a set of images (tasks.score.image_features): the set's colours, whatever
    the seed that drew each image."""
    return np.mean([color_hist(image) for image in images], axis=0)
