"""How a batch of grid cells conditions the pipeline: prompt strings, or A1111-weighted embeddings.

With `render.prompt_syntax = "a1111"`, a prompt (or negative prompt) that uses A1111's syntax or runs
past 75 tokens is encoded as AUTOMATIC1111 encodes it (tasks.render.prompts); every other prompt goes
to the pipeline as text, exactly as before the option existed, so its pixels and image id stay.
A cell with `render.clip_skip` N > 1 (SD1.x) is always encoded here, prompt and negative alike, as A1111
does: under "plain" as diffusers tokenizes (one 77-token window), under "a1111" in chunks. Diffusers' own
`clip_skip` is not used: its N means A1111's N + 1, it skips the negative prompt and it reaches for
`text_model.final_layer_norm`, which transformers 5 no longer has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tasks.models.text_conditioning import encode_captions, text_encoders
from tasks.render.prompts import chunk_prompt, encode_prompt_pair, token_count
from tasks.sweep.cells import Cell
from tasks.sweep.model_family import model_family
from tasks.sweep.plan import RenderJobSpec
from tasks.sweep.prompt_syntax import CHUNK_TOKENS, uses_a1111_syntax
from tasks.sweep.spec import SweepSpec


@dataclass(frozen=True)
class Conditioning:
    """Pipeline keyword arguments for one batch of cells, and what all their PNGs must say to reproduce them."""

    kwargs: dict[str, object]
    infotext: dict[str, str]


class PromptConditioner:
    """Groups cells that can share a pipeline call and builds each group's conditioning."""

    def __init__(self, pipe, job: RenderJobSpec, device: str) -> None:
        self.pipe, self.job, self.device = pipe, job, device
        self.encoders, self.tokenizers = text_encoders(pipe)
        self.keys: dict[tuple[str, int], int] = {}  # group key per (prompt, clip skip): tokenized once, not per cell
        if len(self.encoders) == 2 and job.clip_skips != (1,):
            raise ValueError(f"render.clip_skip {list(job.clip_skips)} does not apply to SDXL; allowed: [1]")

    def a1111_reads_differently(self, text: str) -> bool:
        """The text uses A1111's syntax or is longer than one 75-token chunk."""
        return uses_a1111_syntax(text) or token_count(text, self.tokenizers[0]) > CHUNK_TOKENS

    def group_key(self, cell: Cell) -> int:
        """Cells with one key share a call: 0 for text prompts, else the prompt's chunk count (a batch
        of embeddings must share one length, and A1111 pads a prompt only against its negative)."""
        key = (cell.prompt, cell.clip_skip)
        if key not in self.keys:
            self.keys[key] = self.prompt_key(cell.prompt, cell.clip_skip)
        return self.keys[key]

    def prompt_key(self, prompt: str, clip_skip: int = 1) -> int:
        job = self.job
        if job.prompt_syntax == "plain":
            return 0 if clip_skip == 1 else 1  # one 77-token window either way; 1: encoded here
        if clip_skip == 1 and not (self.a1111_reads_differently(prompt)
                                   or self.a1111_reads_differently(job.negative_prompt)):
            return 0
        return len(chunk_prompt(prompt, self.tokenizers[0]).input_ids)

    def cell_infotext(self, cell: Cell) -> dict[str, str]:
        """A plain-syntax prompt with brackets: A1111 reads them as text only with "Emphasis: None". Clip skip
        as A1111 writes it: only above 1."""
        infotext = {"Clip skip": str(cell.clip_skip)} if cell.clip_skip > 1 else {}
        if self.job.prompt_syntax == "plain" and any(uses_a1111_syntax(t) for t in (cell.prompt,
                                                                                   self.job.negative_prompt)):
            infotext["Emphasis"] = "None"
        return infotext

    def conditioning(self, cells: list[Cell]) -> Conditioning:
        """Conditioning for cells of one group (see group_key; they share one clip skip)."""
        negative, clip_skip = self.job.negative_prompt, cells[0].clip_skip
        prompts, negatives = [c.prompt for c in cells], [negative] * len(cells)
        if self.group_key(cells[0]) == 0:
            return Conditioning({"prompt": prompts, "negative_prompt": negatives}, {})
        if self.job.prompt_syntax == "plain":  # clip skip > 1: diffusers' tokenization, A1111's layer
            embeds = [encode_captions(texts, self.encoders, self.tokenizers, self.device, clip_skip=clip_skip)[0]
                      for texts in (prompts, negatives)]
            return Conditioning({"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}, {})
        pair = encode_prompt_pair(prompts, negatives, self.tokenizers, self.encoders, self.device, clip_skip=clip_skip)
        return Conditioning(pair.pipeline_kwargs(), {"Pad conds": "True"} if pair.padded else {})


def clip_skip_problems(spec: SweepSpec, model_paths: dict[str, str]) -> list[str]:
    """render.clip_skip above 1 on an SDXL base model (A1111 ignores it there), or beyond the text encoder's
    layers (training.clip_skip too); warns, before work, when the training clip skip is not rendered."""
    clip_skips = list(spec.render.clip_skip)
    if spec.training.clip_skip not in clip_skips:
        print(f"warning: training.clip_skip = {spec.training.clip_skip} is not among render.clip_skip {clip_skips}; "
              "a LoRA is usually judged at the clip skip it was trained with")
    problems = []
    for i, model in enumerate(spec.base_models):
        where = f"base_models[{i}] ({model.name})"
        if model_family(model_paths[model.name], model.config) == "sdxl":
            if clip_skips != [1]:
                problems.append(f"render.clip_skip {clip_skips} on {where}: SDXL always conditions on its text "
                                "encoders' penultimate layers and A1111 ignores Clip skip for it; allowed: [1]")
            continue
        layers = text_encoder_layers(Path(model_paths[model.name]), model.config)
        for field, value in (("render.clip_skip", max(clip_skips)), ("training.clip_skip", spec.training.clip_skip)):
            if layers is not None and value > layers:
                problems.append(f"{field} {value} on {where}: its text encoder has {layers} layers; "
                                f"allowed: 1 to {layers}")
    return problems


def text_encoder_layers(model_path: Path, config: str | None) -> int | None:
    """The SD1.x text encoder's layer count from its config.json (None when it cannot be read)."""
    folder = model_path if model_path.is_dir() else Path(config) if config else None
    try:
        return int(json.loads((folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a single file without a config folder: base model validation reports it



def prompt_tokens(prompt: str, syntax: str, tokenizer) -> int:
    """The prompt's CLIP token count: as A1111 shows it (75 per chunk) for "a1111", the tokenizer's own
    count for "plain" (above 75, the text past CLIP's window did not condition the image)."""
    if syntax == "plain":
        return len(tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids)
    return token_count(prompt, tokenizer)
