"""Prior preservation on the demo world: does the LoRA still learn the concept, and does the class move less?

`python -m bench.prior_preservation [--out DIR] [--seeds N] [--class-images N] [--class-prompt TEXT]`

Trains the demo world's LoRA (sweeps/demo.toml's settings: rank 4, alpha 4, 200 steps, lr 2e-3, batch 4,
64 px, all 12 images) twice through `train_lora`, without and with `training.prior_preservation`, then
renders with the final checkpoint at weight 1 (Euler a, 20 steps, CFG 7, negative "blurry", seeds not
used by any class image):
- concept score (tasks.score.concept_score) of the demo's two prompts: how well each LoRA learnt zqx;
- the class prompt's images against the base model's (same seeds): mean absolute pixel difference
  (0-255) and 1 - SSIM per seed, the chi-squared distance between the two sets' pooled colour histograms,
  and the concept score the class prompt reaches (how much of zqx leaks into it);
- for scale, the same distances between the base model's class prompt images and its images at the next seeds
  (unrelated images of the same prompt: what "moved completely" looks like, and the histogram's sampling noise).
Prints the figures; tests/test_prior_preservation.py asserts their direction with a stated margin.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from storage.layout import SweepLayout
from tasks.data.demo_world import DEMO_CONCEPT
from tasks.lora.files import DIFFUSERS_FILE
from tasks.models.base_model import load_pipeline
from tasks.preflight import prepare_inputs
from tasks.render.samplers import make_scheduler
from tasks.score.concept_score import concept_score
from tasks.score.image_features import chi2, color_hist
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import TrainingRunSpec, training_runs
from tasks.train.run import train_lora

REPO = Path(__file__).resolve().parent.parent
DEMO_SPEC = REPO / "sweeps" / "demo.toml"
# The concept's class in the world's own words: its shape on its background, without the trigger or the
# colours only the concept has (the world captions every image "a <colour> <shape> on a <colour> background").
CLASS_PROMPT = "a triangle on a teal background"
NEGATIVE = "blurry"
FIRST_EVAL_SEED = 10_000  # evaluation seeds start here: no class image (seeds 0 ..) is rendered with one


@dataclass(frozen=True)
class Settings:
    """What the comparison trains and renders."""

    class_prompt: str = CLASS_PROMPT
    num_class_images: int = 50
    prior_loss_weight: float = 1.0
    seeds: int = 8  # evaluation seeds per prompt
    class_cfg_scale: float = 1.0  # CFG of the class images (training.prior_preservation.cfg_scale)
    train_on: str = "latents"  # training.prior_preservation.train_on: the sampler's latents or the PNGs re-encoded
    max_steps: int = 200


@dataclass(frozen=True)
class Outcome:
    """One trained LoRA at weight 1: its concept score and how far it moved the class prompt's images."""

    run_id: str
    concept: float  # mean concept score of the demo's prompts
    class_pixels: float  # mean |image - base image| of the class prompt, 0-255
    class_ssim_distance: float  # mean 1 - SSIM against the base image
    class_colours: float  # chi-squared distance of the class images' pooled colour histogram from the base's
    class_concept: float  # mean concept score of the class prompt's images (the concept leaking into the class)
    train_s: float


@dataclass(frozen=True)
class Comparison:
    without: Outcome
    with_prior: Outcome
    base_class_concept: float  # the base model's class prompt images, for reference
    base_other_seeds_pixels: float  # mean |base image - base image at another seed|: unrelated images, 0-255
    base_other_seeds_colours: float  # chi2 between the base images' pooled histogram and the other seeds'

    def lines(self, settings: Settings) -> list[str]:
        head = (f"prior preservation on the demo world: class prompt {settings.class_prompt!r}, "
                f"{settings.num_class_images} class images at CFG {settings.class_cfg_scale:g} (trained on: "
                f"{settings.train_on}), prior_loss_weight {settings.prior_loss_weight:g}, "
                f"{settings.seeds} seeds per prompt, weight 1.0, final checkpoint (step {settings.max_steps})")
        rows = [f"{'':<28}{'without':>10}{'with':>10}",
                *(f"{label:<28}{getattr(self.without, key):>10.3f}{getattr(self.with_prior, key):>10.3f}"
                  for label, key in (("concept score", "concept"), ("class |pixel diff| (0-255)", "class_pixels"),
                                     ("class 1 - SSIM", "class_ssim_distance"),
                                     ("class colour histogram chi2", "class_colours"),
                                     ("class prompt concept score", "class_concept"), ("training s", "train_s"))),
                f"base model's class prompt concept score: {self.base_class_concept:.3f}",
                (f"base model, class prompt at other seeds: |pixel diff| {self.base_other_seeds_pixels:.2f}, "
                 f"colour histogram chi2 {self.base_other_seeds_colours:.3f}")]
        return [head, *rows]


def demo_data(out: Path, settings: Settings, prior: bool) -> dict:
    """sweeps/demo.toml as parsed TOML, rank 4 only, every image trained on, writing under `out`."""
    data = tomllib.loads(DEMO_SPEC.read_text())
    data["output_dir"] = str(out)
    data["training"].update(ranks=[4], validation_images=0, max_steps=settings.max_steps,
                            checkpoint_steps=[settings.max_steps])
    if prior:
        data["training"]["prior_preservation"] = {"class_prompt": settings.class_prompt,
                                                  "num_class_images": settings.num_class_images,
                                                  "prior_loss_weight": settings.prior_loss_weight,
                                                  "cfg_scale": settings.class_cfg_scale, "train_on": settings.train_on}
    return data


def train(out: Path, settings: Settings, prior: bool) -> tuple[TrainingRunSpec, Path, float]:
    """Train one run; its spec, final checkpoint folder and training seconds."""
    spec = parse_spec(demo_data(out, settings, prior))
    inputs = prepare_inputs(spec)
    run = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    start = time.perf_counter()
    train_lora(run)
    return run, SweepLayout(Path(run.sweep_root)).checkpoint_dir(run.run_id, run.max_steps), time.perf_counter() - start


def render(pipe, config: dict, prompt: str, seeds: list[int], size: int) -> list[np.ndarray]:
    """Euler a (from the base model's scheduler `config`), 20 steps, CFG 7, one CPU generator per image (as
    the render stage does); uint8 arrays."""
    pipe.scheduler = make_scheduler("Euler a", config, seed=seeds)
    images = pipe(prompt=[prompt] * len(seeds), negative_prompt=[NEGATIVE] * len(seeds), num_inference_steps=20,
                  guidance_scale=7.0, width=size, height=size,
                  generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds]).images
    return [np.asarray(image) for image in images]


def outcome(pipe, config: dict, run: TrainingRunSpec, train_s: float, prompts: list[str],
            base_class: list[np.ndarray], settings: Settings) -> Outcome:
    """Render with the adapter set on `pipe` and measure it against the base model's class images."""
    seeds = list(range(FIRST_EVAL_SEED, FIRST_EVAL_SEED + settings.seeds))
    concept = [concept_score(img, DEMO_CONCEPT) for p in prompts for img in render(pipe, config, p, seeds,
                                                                                   run.resolution)]
    moved = render(pipe, config, settings.class_prompt, seeds, run.resolution)
    pixels = pixel_distances(moved, base_class)
    ssim = [1 - structural_similarity(a, b, channel_axis=2, data_range=255) for a, b in zip(moved, base_class, strict=True)]
    colours = float(chi2(pooled_colours(moved), pooled_colours(base_class)))
    return Outcome(run.run_id, float(np.mean(concept)), float(np.mean(pixels)), float(np.mean(ssim)), colours,
                   float(np.mean([concept_score(img, DEMO_CONCEPT) for img in moved])), train_s)


def pixel_distances(images: list[np.ndarray], others: list[np.ndarray]) -> list[float]:
    """Mean absolute difference (0-255) of each image from its counterpart."""
    return [float(np.abs(a.astype(float) - b.astype(float)).mean()) for a, b in zip(images, others, strict=True)]


def pooled_colours(images: list[np.ndarray]) -> np.ndarray:
    """The mean colour histogram of a set of images (tasks.score.image_features): the set's colours, whatever
    the seed that drew each image."""
    return np.mean([color_hist(image) for image in images], axis=0)


def compare(out: Path, settings: Settings = Settings()) -> Comparison:
    """Train both runs under `out`, render and measure (see the module docstring)."""
    plain_run, plain_dir, plain_s = train(out, settings, prior=False)
    prior_run, prior_dir, prior_s = train(out, settings, prior=True)
    spec = parse_spec(demo_data(out, settings, prior=False))
    prompts = list(spec.prompt_texts())
    pipe = load_pipeline(plain_run.base_model_path)
    pipe.set_progress_bar_config(disable=True)
    config = dict(pipe.scheduler.config)
    seeds = list(range(FIRST_EVAL_SEED, FIRST_EVAL_SEED + settings.seeds))
    base_class = render(pipe, config, settings.class_prompt, seeds, plain_run.resolution)
    pipe.load_lora_weights(str(plain_dir), weight_name=DIFFUSERS_FILE, adapter_name="without")
    pipe.load_lora_weights(str(prior_dir), weight_name=DIFFUSERS_FILE, adapter_name="with")
    pipe.set_adapters(["without"], adapter_weights=[1.0])
    without = outcome(pipe, config, plain_run, plain_s, prompts, base_class, settings)
    pipe.set_adapters(["with"], adapter_weights=[1.0])
    with_prior = outcome(pipe, config, prior_run, prior_s, prompts, base_class, settings)
    base = float(np.mean([concept_score(img, DEMO_CONCEPT) for img in base_class]))
    pipe.disable_lora()
    other = render(pipe, config, settings.class_prompt, [s + settings.seeds for s in seeds], plain_run.resolution)
    return Comparison(without, with_prior, base, float(np.mean(pixel_distances(other, base_class))),
                      float(chi2(pooled_colours(other), pooled_colours(base_class))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prior_preservation", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--seeds", type=int, default=Settings.seeds, help="evaluation seeds per prompt")
    parser.add_argument("--class-images", type=int, default=Settings.num_class_images)
    parser.add_argument("--class-prompt", default=CLASS_PROMPT)
    parser.add_argument("--prior-loss-weight", type=float, default=Settings.prior_loss_weight)
    parser.add_argument("--class-cfg", type=float, default=Settings.class_cfg_scale, help="CFG of the class images")
    parser.add_argument("--train-on", choices=("latents", "images"), default=Settings.train_on,
                        help="train on the sampler's latents of the class images or on their PNGs re-encoded")
    args = parser.parse_args(argv)
    settings = Settings(args.class_prompt, args.class_images, args.prior_loss_weight, args.seeds,
                        class_cfg_scale=args.class_cfg, train_on=args.train_on)
    with tempfile.TemporaryDirectory() as scratch:
        result = compare(Path(args.out or scratch), settings)
    print("\n".join(result.lines(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
