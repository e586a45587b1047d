"""How a batch of grid cells conditions the pipeline: prompt strings, or A1111-weighted embeddings.

With `render.prompt_syntax = "a1111"`, a prompt (or negative prompt) that uses A1111's syntax or runs
past 75 tokens is encoded as AUTOMATIC1111 encodes it (tasks.render.prompts); every other prompt goes
to the pipeline as text, exactly as before the option existed, so its pixels and image id stay.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.models.text_conditioning import text_encoders
from tasks.render.prompts import chunk_prompt, encode_prompt_pair, token_count
from tasks.sweep.plan import Cell, RenderJobSpec
from tasks.sweep.prompt_syntax import CHUNK_TOKENS, uses_a1111_syntax


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
        self.keys: dict[str, int] = {}  # group key per prompt: tokenized once, not once per cell

    def a1111_reads_differently(self, text: str) -> bool:
        """The text uses A1111's syntax or is longer than one 75-token chunk."""
        return uses_a1111_syntax(text) or token_count(text, self.tokenizers[0]) > CHUNK_TOKENS

    def group_key(self, cell: Cell) -> int:
        """Cells with one key share a call: 0 for text prompts, else the prompt's chunk count (a batch
        of embeddings must share one length, and A1111 pads a prompt only against its negative)."""
        if cell.prompt not in self.keys:
            self.keys[cell.prompt] = self.prompt_key(cell.prompt)
        return self.keys[cell.prompt]

    def prompt_key(self, prompt: str) -> int:
        job = self.job
        if job.prompt_syntax == "plain" or not (self.a1111_reads_differently(prompt)
                                                or self.a1111_reads_differently(job.negative_prompt)):
            return 0
        return len(chunk_prompt(prompt, self.tokenizers[0]).input_ids)

    def cell_infotext(self, cell: Cell) -> dict[str, str]:
        """A plain-syntax prompt with brackets: A1111 reads them as text only with "Emphasis: None"."""
        if self.job.prompt_syntax == "plain" and any(uses_a1111_syntax(t) for t in (cell.prompt,
                                                                                   self.job.negative_prompt)):
            return {"Emphasis": "None"}
        return {}

    def conditioning(self, cells: list[Cell]) -> Conditioning:
        """Conditioning for cells of one group (see group_key)."""
        negative = self.job.negative_prompt
        if self.group_key(cells[0]) == 0:
            return Conditioning({"prompt": [c.prompt for c in cells], "negative_prompt": [negative] * len(cells)}, {})
        pair = encode_prompt_pair([c.prompt for c in cells], [negative] * len(cells), self.tokenizers, self.encoders,
                                  self.device)
        return Conditioning(pair.pipeline_kwargs(), {"Pad conds": "True"} if pair.padded else {})



def prompt_tokens(prompt: str, syntax: str, tokenizer) -> int:
    """The prompt's CLIP token count: as A1111 shows it (75 per chunk) for "a1111", the tokenizer's own
    count for "plain" (above 75, the text past CLIP's window did not condition the image)."""
    if syntax == "plain":
        return len(tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids)
    return token_count(prompt, tokenizer)
