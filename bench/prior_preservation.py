"""Prior preservation on the demo world: does the LoRA still learn the concept, and does the class move less?

`python -m bench.prior_preservation [--out DIR] [--seeds N] [--class-images N] [--class-prompt TEXT]`

Trains the demo world's LoRA (sweeps/demo.toml's settings: rank 4, alpha 4, 200 steps, lr 2e-3, batch 4,
64 px, all 12 images) twice through `train_lora`, without and with `training.prior_preservation`, then
renders with the final checkpoint at weight 1 (20 steps, seeds not used by any class image). Under the
render stage's demo settings (Euler a, CFG 7, negative "blurry"):
- concept score (tasks.score.concept_score) of the demo's two prompts: how well each LoRA learnt zqx;
- the class prompt's images against the base model's (same seeds): mean absolute pixel difference
  (0-255) and 1 - SSIM per seed, the chi-squared distance between the two sets' pooled colour histograms,
  and the concept score the class prompt reaches (how much of zqx leaks into it).
Then the class prompt's pixel difference, 1 - SSIM and chi2 under each of bench.class_movement's render
settings, which separate the causes: (a) Euler a, CFG 7, negative "blurry"; (b) Euler (deterministic), CFG 7,
negative "blurry"; (c) Euler, CFG 7, negative "" (empty); (d) Euler, CFG 1 (the conditional prediction the prior loss
trains). Each setting also gives, for scale, the same distances between the base model's class prompt images
and its images at the next seeds (unrelated images of the same prompt: what "moved completely" looks like, and
the histogram's sampling noise), and the per-seed (with - without) pixel difference with its standard error.
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

from bench.class_movement import RENDER_SETTINGS, Movement, RenderSetting, SettingFigures, movement, render
from storage.layout import SweepLayout
from tasks.data.demo_world import DEMO_CONCEPT
from tasks.lora.files import DIFFUSERS_FILE
from tasks.models.base_model import load_pipeline
from tasks.preflight import prepare_inputs
from tasks.score.concept_score import concept_score
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import TrainingRunSpec, training_runs
from tasks.train.run import train_lora

REPO = Path(__file__).resolve().parent.parent
DEMO_SPEC = REPO / "sweeps" / "demo.toml"
# The concept's class in the world's own words: its shape on its background, without the trigger or the
# colours only the concept has (the world captions every image "a <colour> <shape> on a <colour> background").
CLASS_PROMPT = "a triangle on a teal background"
FIRST_EVAL_SEED = 10_000  # evaluation seeds start here: no class image (seeds 0 ..) is rendered with one


@dataclass(frozen=True)
class Settings:
    """What the comparison trains and renders."""

    class_prompt: str = CLASS_PROMPT
    num_class_images: int = 50
    prior_loss_weight: float = 1.0
    seeds: int = 16  # evaluation seeds per prompt
    class_cfg_scale: float = 1.0  # CFG of the class images (training.prior_preservation.cfg_scale)
    train_on: str = "latents"  # training.prior_preservation.train_on: the sampler's latents or the PNGs re-encoded
    max_steps: int = 200


@dataclass(frozen=True)
class Outcome:
    """One trained LoRA at weight 1: its concept score and how far it moved the class prompt's images, under
    the first render setting (the render stage's: Euler a, CFG 7, negative "blurry")."""

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
    by_setting: tuple[SettingFigures, ...] = ()  # the class prompt's movement under each render setting

    def setting(self, label: str) -> SettingFigures:
        """The figures of the render setting labelled `label` ("a" .. "d")."""
        return next(figures for figures in self.by_setting if figures.setting.label == label)

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
                 f"colour histogram chi2 {self.base_other_seeds_colours:.3f}"),
                "class prompt vs base images under each render setting (unrelated: base model at other seeds):"]
        return [head, *rows, *(line for figures in self.by_setting for line in figures.lines())]


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


def eval_seeds(settings: Settings) -> list[int]:
    """The evaluation seeds, none of them a class image's."""
    return list(range(FIRST_EVAL_SEED, FIRST_EVAL_SEED + settings.seeds))


def measure_lora(pipe, config: dict, run: TrainingRunSpec, train_s: float, prompts: list[str],
                 base: dict[str, list[np.ndarray]], settings: Settings,
                 render_settings: tuple[RenderSetting, ...]) -> tuple[Outcome, dict[str, Movement]]:
    """Render with the adapter set on `pipe`: its Outcome under the first render setting, and the class
    prompt's movement from the base model's images (`base`, by setting label) under each setting."""
    seeds, size, first = eval_seeds(settings), run.resolution, render_settings[0]
    images = {s.label: render(pipe, config, settings.class_prompt, seeds, size, s) for s in render_settings}
    moved = {label: movement(found, base[label]) for label, found in images.items()}
    concept = [concept_score(img, DEMO_CONCEPT) for p in prompts for img in render(pipe, config, p, seeds, size, first)]
    leak = [concept_score(img, DEMO_CONCEPT) for img in images[first.label]]
    headline = moved[first.label]
    return (Outcome(run.run_id, float(np.mean(concept)), headline.pixels, headline.ssim_distance, headline.colours,
                    float(np.mean(leak)), train_s), moved)


def compare(out: Path, settings: Settings = Settings(),
            render_settings: tuple[RenderSetting, ...] = RENDER_SETTINGS) -> Comparison:
    """Train both runs under `out`, render and measure (see the module docstring)."""
    plain_run, plain_dir, plain_s = train(out, settings, prior=False)
    prior_run, prior_dir, prior_s = train(out, settings, prior=True)
    prompts = list(parse_spec(demo_data(out, settings, prior=False)).prompt_texts())
    pipe = load_pipeline(plain_run.base_model_path)
    pipe.set_progress_bar_config(disable=True)
    config, seeds, size = dict(pipe.scheduler.config), eval_seeds(settings), plain_run.resolution
    others = [s + settings.seeds for s in seeds]
    base = {s.label: render(pipe, config, settings.class_prompt, seeds, size, s) for s in render_settings}
    unrelated = {s.label: movement(render(pipe, config, settings.class_prompt, others, size, s), base[s.label])
                 for s in render_settings}
    pipe.load_lora_weights(str(plain_dir), weight_name=DIFFUSERS_FILE, adapter_name="without")
    pipe.load_lora_weights(str(prior_dir), weight_name=DIFFUSERS_FILE, adapter_name="with")
    pipe.set_adapters(["without"], adapter_weights=[1.0])
    without, moved_without = measure_lora(pipe, config, plain_run, plain_s, prompts, base, settings, render_settings)
    pipe.set_adapters(["with"], adapter_weights=[1.0])
    with_prior, moved_with = measure_lora(pipe, config, prior_run, prior_s, prompts, base, settings, render_settings)
    first = render_settings[0].label
    by_setting = tuple(SettingFigures(s, moved_without[s.label], moved_with[s.label], unrelated[s.label])
                       for s in render_settings)
    return Comparison(without, with_prior, float(np.mean([concept_score(img, DEMO_CONCEPT) for img in base[first]])),
                      unrelated[first].pixels, unrelated[first].colours, by_setting)


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
