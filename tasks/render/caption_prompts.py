"""Resolve `render.caption_prompts` before any work: the dataset's captions as training reads them, the
held-out images by training's own rule (tasks.train.validation.split_validation), then the draw
(tasks.sweep.caption_prompts). Called by the preflight, which loads torch anyway; the plan gets the result.
"""

from __future__ import annotations

from pathlib import Path

from tasks.data.dataset import MIN_IMAGE_SIDE
from tasks.data.sources import load_dataset
from tasks.sweep.caption_prompts import CaptionPrompt, draw_caption_prompts
from tasks.sweep.spec import SweepSpec
from tasks.train.validation import split_validation


def resolve_caption_prompts(spec: SweepSpec, dataset_path: str, resolution: int) -> tuple[CaptionPrompt, ...]:
    """The caption prompts `spec` asks for (none when render.caption_prompts is unset); ValueError naming
    the field, the value and what is allowed when they cannot be drawn."""
    choice = spec.render.caption_prompts
    if choice is None:
        return ()
    if len(spec.dataset_specs()) > 1:
        raise ValueError("render.caption_prompts does not support [[datasets]] variants yet (whose captions?); "
                         "allowed: one dataset")
    splits = sorted({(c.training.validation_images, c.training.seed) for c in spec.training_configs()})
    if len(splits) > 1:
        raise ValueError(f"render.caption_prompts: the training variants hold out different images "
                         f"((validation_images, seed): {splits}); allowed: one validation_images and seed")
    (count, seed), = splits
    # The same scan training makes (tasks.train.run), so the same items in the same order are held out.
    items = load_dataset(spec.dataset, Path(dataset_path), min_size=min(MIN_IMAGE_SIDE, resolution)).items
    _, held_out = split_validation(items, count, seed)
    rows = [(item.image_id, str(item.path), item.caption) for item in items]
    return draw_caption_prompts(rows, {item.image_id for item in held_out}, choice, seed, spec.render.prompt_syntax)
