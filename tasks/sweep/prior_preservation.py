"""`[training.prior_preservation]`: DreamBooth-style prior preservation, as a small typed spec section.

The base model renders `num_class_images` images of `class_prompt` once (tasks.train.class_images,
cached by content); every step then trains on a batch of them beside the instance batch, and the
optimised loss is instance loss + `prior_loss_weight` x class loss (diffusers' train_dreambooth_lora
`--with_prior_preservation`; kohya's regularisation images). No torch: the spec validates it here.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from tasks.sweep.fields import Frozen, Seed
from tasks.sweep.sampler_names import resolve_sampler

TRIGGER_PLACEHOLDER = "{trigger}"
EXAMPLE = "e.g. 'a photo of a dog', where the instance captions say 'a photo of sks dog'"


class PriorPreservationSpec(Frozen):
    """Class images rendered by the base model, trained beside the instance images with a loss weight.

    Class image i is rendered from `class_prompt` (and `negative_prompt`) with seed `seed + i`, the
    `sampler` at `steps` and `cfg_scale`, square at the run's resolution (Euler a, 20 steps). The class loss
    leaves the base model where it is only when the class examples are the model's own samples of the
    class prompt, so by default they are drawn without guidance (CFG 1; diffusers' script uses its pipeline's
    7.5) and trained on as the latents the sampler produced (`train_on = "latents"`), not re-encoded from
    their PNGs by the lossy VAE (`"images"`, as diffusers and kohya do). Measured in the README. The
    `num_class_images` default is diffusers' 100.
    """

    class_prompt: str = Field(min_length=1, max_length=1000)
    num_class_images: int = Field(default=100, ge=1, le=10_000)
    prior_loss_weight: float = Field(default=1.0, gt=0, le=100)
    seed: Seed = 0
    sampler: str = "Euler a"
    steps: int = Field(default=20, ge=1, le=500)
    cfg_scale: float = Field(default=1.0, ge=0, le=50)
    negative_prompt: str = ""
    train_on: Literal["latents", "images"] = "latents"

    @field_validator("class_prompt")
    @classmethod
    def _has_words(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(f"the class prompt is blank; allowed: words naming the subject's class ({EXAMPLE})")
        return value

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        resolve_sampler(value)  # its ValueError names the value, the closest name and every valid one
        return value


def class_prompt_problems(prior: PriorPreservationSpec | None, trigger_word: str) -> list[str]:
    """A class prompt that names the subject: its images would teach the trigger the base model's idea of
    the class (the opposite of preserving it). The trigger is matched as a word, case-insensitively
    (CLIP's tokenizer lower-cases)."""
    if prior is None:
        return []
    prompt, field = prior.class_prompt, "training.prior_preservation.class_prompt"
    if TRIGGER_PLACEHOLDER in prompt:
        return [f"{field} {prompt!r} holds {TRIGGER_PLACEHOLDER}; allowed: the class alone ({EXAMPLE})"]
    if re.search(rf"(?<![A-Za-z0-9_]){re.escape(trigger_word)}(?![A-Za-z0-9_])", prompt, re.IGNORECASE):
        return [f"{field} {prompt!r} contains the trigger word {trigger_word!r}; allowed: the class alone ({EXAMPLE})"]
    return []
