"""A render job's grid: its cells in render order, and each image's content id. No torch.

The grid is the product of the job's LoRA weights, samplers, step counts, CFG scales and clip skips,
with prompts (the spec's, then caption prompts) x seeds innermost so they batch. An image's id hashes
everything that determines its pixels; options added after the first images were rendered enter it
only away from the values those images implied (LATER_IMAGE_OPTIONS, tasks.sweep.ids).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.sweep.caption_prompts import CaptionPrompt
from tasks.sweep.ids import content_id, with_later_options
from tasks.sweep.prompt_syntax import may_render_differently

if TYPE_CHECKING:  # plan.py imports this module; the job type is only named here
    from tasks.sweep.plan import RenderJobSpec

# "auto" precision and no extra LoRAs are the images from before those options; an image rendered in
# fp32 keeps its id whether "auto" or "fp32" asked for it. Clip skip 1 and no caption source: every
# image before those options.
LATER_IMAGE_OPTIONS: dict[str, tuple[object, ...]] = {"extra_loras": ([],), "precision": ("auto", "fp32"),
                                                      "prompt_syntax": ("plain",), "clip_skip": (1,),
                                                      "caption_source": (None,)}


@dataclass(frozen=True)
class Cell:
    """One image of a render job's grid, before rendering."""

    sampler: str
    steps: int
    cfg_scale: float
    lora_weight: float
    prompt_index: int
    prompt: str
    seed: int
    clip_skip: int = 1
    caption: CaptionPrompt | None = None  # set for a caption prompt: its source image and held-out mark


def grid_cells(job: RenderJobSpec) -> list[Cell]:
    """All cells in render order: prompts (the spec's, then caption prompts) x seeds innermost, to batch."""
    prompts = [*((p, None) for p in job.prompts), *((c.prompt, c) for c in job.caption_prompts)]
    return [
        Cell(sampler, steps, cfg, weight, pi, prompt, seed, clip_skip, caption)
        for weight, sampler, steps, cfg, clip_skip in itertools.product(job.lora_weights, job.samplers, job.steps,
                                                                         job.cfg_scales, job.clip_skips)
        for (pi, (prompt, caption)), seed in itertools.product(enumerate(prompts), job.seeds)
    ]


def prompt_syntax_in_effect(syntax: str, prompts: Sequence[str], negative_prompt: str) -> str:
    """`syntax`, or "plain" when no prompt (nor the negative) can condition differently under it."""
    if syntax == "plain" or not any(may_render_differently(p) for p in [*prompts, negative_prompt]):
        return "plain"
    return syntax


def image_id(job: RenderJobSpec, cell: Cell) -> str:
    """Identity of an image: everything that determines its pixels."""
    ckpt = job.checkpoint.checkpoint_id if job.checkpoint else None
    weight = cell.lora_weight if ckpt else 0.0
    identity = {
        "model": job.base_model.model_dump(), "checkpoint": ckpt, "sampler": cell.sampler, "steps": cell.steps,
        "cfg": cell.cfg_scale, "weight": weight, "prompt": cell.prompt, "negative": job.negative_prompt,
        "seed": cell.seed, "size": [job.width, job.height],
    }
    later = {"extra_loras": [[x.name, x.sha256, x.weight] for x in job.extra_loras], "precision": job.precision,
             "prompt_syntax": prompt_syntax_in_effect(job.prompt_syntax, [cell.prompt], job.negative_prompt),
             "clip_skip": cell.clip_skip, "caption_source": cell.caption.source_id if cell.caption else None}
    return content_id(with_later_options(identity, later, LATER_IMAGE_OPTIONS))
