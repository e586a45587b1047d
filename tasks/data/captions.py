"""Caption handling: trigger-word prefix, per-step dropout and tag shuffle, and captioning models.

The per-step functions are pure: they take a seeded numpy Generator, so the same seed gives the
same captions. Captioning models load from a local folder only; nothing is fetched from a hub.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BlipForConditionalGeneration, BlipProcessor

from tasks.data.dataset import DatasetItem, to_rgb


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether `trigger` appears in the caption as a whole word."""
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption) is not None


def prefix_trigger(caption: str, trigger: str) -> str:
    """`trigger, caption` unless the caption already names the trigger word."""
    return caption if has_trigger(caption, trigger) else f"{trigger}, {caption}"


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_tags(caption: str, keep_tokens: int, rng: np.random.Generator) -> str:
    """Shuffle the comma-separated tags after the first `keep_tokens` (kohya's keep_tokens)."""
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = rng.permutation(len(rest))
    return ", ".join(kept + [rest[i] for i in order])


def drop_caption(caption: str, probability: float, rng: np.random.Generator) -> str:
    """The empty caption with `probability` (unconditional training for CFG), else the caption."""
    return "" if probability > 0 and rng.random() < probability else caption


def training_caption(caption: str, rng: np.random.Generator, *, dropout: float = 0.0, shuffle: bool = False,
                     keep_tokens: int = 0) -> str:
    """The caption one training step sees: dropout decided first, then tags shuffled."""
    caption = drop_caption(caption, dropout, rng)
    return shuffle_tags(caption, keep_tokens, rng) if shuffle and caption else caption


class Captioner(Protocol):
    """Anything that writes one caption per image."""

    def caption(self, images: list[Image.Image]) -> list[str]: ...


class CaptionerError(ValueError):
    """A captioner that cannot be loaded, with what to do about it."""


class BlipCaptioner:
    """BLIP image captioning from a local folder (processor + BlipForConditionalGeneration)."""

    def __init__(self, path: str | Path, *, device: str = "cpu", max_new_tokens: int = 30,
                 batch_size: int = 8) -> None:
        folder = Path(path)
        problem = captioner_problem(f"blip:{folder}")
        if problem:
            raise CaptionerError(problem)
        self.processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
        self.model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.device, self.max_new_tokens, self.batch_size = device, max_new_tokens, batch_size

    def caption(self, images: list[Image.Image]) -> list[str]:
        """Greedy captions (deterministic), one per image."""
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [img.convert("RGB") for img in images[start : start + self.batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device)
            with torch.no_grad():
                out = self.model.generate(pixel_values=inputs.pixel_values, max_new_tokens=self.max_new_tokens,
                                          do_sample=False)
            captions += [text.strip() for text in self.processor.batch_decode(out, skip_special_tokens=True)]
        return captions


def load_captioner(value: str, *, device: str = "cpu") -> Captioner:
    """A captioner from the spec's `captioner` value, e.g. 'blip:/models/blip-large'."""
    kind, _, path = value.partition(":")
    if kind != "blip" or not path:
        raise CaptionerError(f"captioner {value!r}: allowed: 'blip:<local folder>'")
    return BlipCaptioner(path, device=device)


def captioner_problem(value: str) -> str | None:
    """A cheap check before any model loads: the captioner folder exists and has a config."""
    path = Path(value.partition(":")[2])
    if not (path / "config.json").is_file():
        return (f"dataset.captioner {value!r}: {path} is not a local BLIP model folder (no config.json); "
                "nothing is downloaded, so save the model there first")
    return None


def fill_missing_captions(items: list[DatasetItem], captioner: Captioner) -> list[DatasetItem]:
    """Items with empty captions get the captioner's text; the rest are returned unchanged."""
    missing = [i for i, item in enumerate(items) if not item.caption]
    if not missing:
        return items
    images = []
    for i in missing:
        with Image.open(items[i].path) as img:
            images.append(to_rgb(ImageOps.exif_transpose(img)))
    texts = captioner.caption(images)
    filled = list(items)
    for i, text in zip(missing, texts, strict=True):
        if not text.strip():
            raise ValueError(f"{items[i].path.name}: the captioner returned an empty caption; write one by hand")
        filled[i] = replace(items[i], caption=text.strip())
    return filled
