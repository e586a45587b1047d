"""Caption prompts: training captions rendered as prompts, each compared with its own training image.

`render.caption_prompts = "all" | N` adds a second prompt set to every render job: every held-out
validation image's caption (`training.validation_images`, held out by training's own rule) plus all
or N (drawn by `training.seed`) of the trained images' captions. Each is a `CaptionPrompt` naming its
source image, so a render is scored against the image its caption came from (tasks.score.caption_fidelity)
and trained and held-out captions are reported apart. No torch: the plan and the flow use this.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

PromptSource = Literal["spec", "caption"]
CAPTION_DRAW_STREAM = 2  # the draw of N trained captions never shares the validation split's random stream
_A1111_SPECIAL = re.compile(r"([()\[\]\\])")


class CaptionPrompt(BaseModel):
    """One training caption as a prompt: the text rendered, its source image and whether training saw it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str  # the caption as rendered (A1111's brackets escaped under prompt_syntax "a1111")
    source_id: str  # the dataset item's image id (file stem + content hash): the metrics' reference_id
    source_path: str  # the training image file
    held_out: bool  # a validation image: its caption never conditioned training


def caption_choice(value: object) -> object:
    """render.caption_prompts as written: "all", a whole number of trained captions, or absent (None)."""
    if value is None or value == "all" or (type(value) is int and value >= 1):
        return value
    raise ValueError("allowed: 'all' or a number of trained captions to draw (1 or more)")


def escape_a1111(caption: str) -> str:
    """The caption as A1111 reads it literally: brackets and backslashes escaped, as training saw the text."""
    return _A1111_SPECIAL.sub(r"\\\1", caption)


def draw_caption_prompts(items: Sequence[tuple[str, str, str]], held_out_ids: set[str], choice: str | int,
                         seed: int, prompt_syntax: str) -> tuple[CaptionPrompt, ...]:
    """Every held-out item and all (`choice` "all") or `choice` trained items drawn by `seed`, in dataset
    order. `items`: (image id, path, caption) as training reads them. ValueError when N exceeds the trained
    images or a caption is empty."""
    trained = [i for i, (image_id, _, _) in enumerate(items) if image_id not in held_out_ids]
    empty = [items[i][1] for i in range(len(items)) if not items[i][2].strip()]
    if empty:
        raise ValueError(f"render.caption_prompts: {len(empty)} image(s) have no caption ({', '.join(empty[:3])}); "
                         "every image needs a caption before training (a captioner writes them only during it)")
    if choice != "all" and int(choice) > len(trained):
        raise ValueError(f"render.caption_prompts = {choice} exceeds the {len(trained)} trained images; "
                         f"allowed: 1 to {len(trained)}, or 'all'")
    if choice == "all":
        chosen = set(trained)
    else:
        order = np.random.default_rng([seed, CAPTION_DRAW_STREAM]).permutation(len(trained))
        chosen = {trained[k] for k in order[: int(choice)].tolist()}
    held = {i for i, (image_id, _, _) in enumerate(items) if image_id in held_out_ids}
    escape = escape_a1111 if prompt_syntax == "a1111" else str
    return tuple(CaptionPrompt(prompt=escape(items[i][2]), source_id=items[i][0], source_path=items[i][1],
                               held_out=i in held)
                 for i in range(len(items)) if i in chosen or i in held)
