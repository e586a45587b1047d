"""A1111-compatible prompts: emphasis parsing, 75-token chunking and weighted CLIP encoding.

Reproduces AUTOMATIC1111 v1.10 (`prompt_parser.parse_prompt_attention`, `sd_hijack_clip`, emphasis
"Original") so prompts written for the webui ((x), [x], (x:1.3), BREAK, more than 75 tokens) condition the
diffusers pipelines as they do there. A plain prompt of <= 75 tokens gives exactly diffusers' own
`encode_prompt` embeddings, bit for bit. Clip skip (SD1.x) as A1111: the N-th hidden state from the end through
the final layer norm, before emphasis. Prompt scheduling ([a:b:N], [a|b]), AND and textual inversion are not
handled here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tasks.models.text_conditioning import clip_skip_states
from tasks.sweep.prompt_syntax import (
    CHUNK_LENGTH,
    CHUNK_TOKENS,
    COMMA_TOKEN,
    is_break,
    parse_prompt_attention,
)


@dataclass(frozen=True)
class PromptChunks:
    """A prompt as 77-token CLIP inputs, one row per chunk: BOS + 75 tokens + EOS, padded with the
    tokenizer's pad id (EOS for SD1.x CLIP, 0 for SDXL's OpenCLIP-G). `multipliers` holds each position's
    emphasis weight (1.0 on BOS, EOS and padding). `token_count` is the count A1111 shows as "N/75":
    every chunk but the last counts 75, so padding inserted by BREAK or a comma wrap counts as well."""

    input_ids: tuple[tuple[int, ...], ...]
    multipliers: tuple[tuple[float, ...], ...]
    token_count: int

    def ids_tensor(self, device: str | torch.device) -> torch.Tensor:
        """The token ids as a (chunks, 77) long tensor."""
        return torch.tensor(self.input_ids, dtype=torch.long, device=device)

    def multipliers_tensor(self, device: str | torch.device) -> torch.Tensor:
        """The multipliers as a (chunks, 77) float32 tensor."""
        return torch.tensor(self.multipliers, dtype=torch.float32, device=device)


@dataclass
class ChunkFiller:
    """Fills 75-token chunks one token at a time (A1111's `tokenize_line` state)."""

    bos: int
    eos: int
    pad: int
    comma: int | None
    comma_backtrack: int
    ids: list[tuple[int, ...]] = field(default_factory=list)
    multipliers: list[tuple[float, ...]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    last_comma: int = -1
    token_count: int = 0

    def flush(self, *, is_last: bool = False) -> None:
        """Close the current chunk (padding it to 77) and start an empty one."""
        self.token_count += len(self.tokens) if is_last else CHUNK_TOKENS
        fill = CHUNK_TOKENS - len(self.tokens)
        self.ids.append((self.bos, *self.tokens, self.eos, *[self.pad] * fill))
        self.multipliers.append((1.0, *self.weights, 1.0, *[1.0] * fill))
        self.tokens, self.weights, self.last_comma = [], [], -1

    def add(self, token: int, weight: float) -> None:
        """Append a token; a full chunk is closed first, at its last comma when that is near its end."""
        if token == self.comma:
            self.last_comma = len(self.tokens)
        elif (self.comma_backtrack and len(self.tokens) == CHUNK_TOKENS and self.last_comma != -1
              and CHUNK_TOKENS - self.last_comma <= self.comma_backtrack):
            cut = self.last_comma + 1
            moved_tokens, moved_weights = self.tokens[cut:], self.weights[cut:]
            self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
            self.flush()
            self.tokens, self.weights = moved_tokens, moved_weights
        if len(self.tokens) == CHUNK_TOKENS:
            self.flush()
        self.tokens.append(token)
        self.weights.append(weight)


def chunk_prompt(text: str, tokenizer: Any, *, comma_backtrack: int = 20) -> PromptChunks:
    """Tokenize an A1111 prompt into 77-token chunks: each parsed segment on its own (so `(wo)rd` is not
    `word`), BREAK starts a new chunk, a full chunk breaks after its last comma if that lies within
    `comma_backtrack` tokens of its end (A1111's "Prompt word wrap length limit"), and even "" has one chunk."""
    if not 0 <= comma_backtrack < CHUNK_TOKENS:
        raise ValueError(f"comma_backtrack must be in 0..{CHUNK_TOKENS - 1}, got {comma_backtrack}")
    segments = parse_prompt_attention(text)
    tokenized = tokenizer([t for t, _ in segments], add_special_tokens=False, truncation=False,
                          verbose=False)["input_ids"]  # verbose: no "longer than 77" warning, chunks handle that
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    comma = tokenizer.convert_tokens_to_ids(COMMA_TOKEN)
    comma = None if comma == tokenizer.unk_token_id else comma  # a vocabulary without ",</w>": no backtracking
    filler = ChunkFiller(tokenizer.bos_token_id, tokenizer.eos_token_id, pad, comma, comma_backtrack)
    for segment, tokens in zip(segments, tokenized):
        if is_break(segment):
            filler.flush()
            continue
        for token in tokens:
            filler.add(token, segment[1])
    if filler.tokens or not filler.ids:
        filler.flush(is_last=True)
    return PromptChunks(tuple(filler.ids), tuple(filler.multipliers), filler.token_count)


def token_count(text: str, tokenizer: Any) -> int:
    """The prompt's token count as A1111 shows it ("N/75"); more than 75 means more than one chunk."""
    return chunk_prompt(text, tokenizer).token_count


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk's (77, C) hidden states: scale each token by its weight,
    then restore the chunk's mean. Untouched (bit for bit) when every weight is 1."""
    if bool((multipliers == 1.0).all()):
        return z
    original_mean = z.mean()
    weighted = z * multipliers[:, None]  # float32 like A1111: an fp16 z is promoted here
    weighted = weighted * (original_mean / weighted.mean())
    return weighted.to(z.dtype)


def encode_chunks(chunks: PromptChunks, text_encoder: Any, device: str | torch.device, *,
                  penultimate: bool, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One encoder's weighted hidden states (1, 77*N, C) for a prompt's chunks, and its first output of the
    first chunk (the projected pooled vector for CLIPTextModelWithProjection), taken before emphasis.
    `clip_skip` picks the layer when not `penultimate` (SD1.x; tasks.models.text_conditioning.clip_skip_states)."""
    ids, multipliers = chunks.ids_tensor(device), chunks.multipliers_tensor(device)
    weighted, first_output = [], None
    for index in range(ids.shape[0]):  # one chunk per call, as A1111 does: each chunk's numbers stand alone
        row = ids[index:index + 1]
        if penultimate:
            output = text_encoder(row, output_hidden_states=True)
            hidden, first = output.hidden_states[-2], output[0]
        else:
            hidden = first = clip_skip_states(text_encoder, row, clip_skip)
        weighted.append(apply_emphasis(hidden[0], multipliers[index].to(hidden.device)))
        first_output = first if first_output is None else first_output
    return torch.cat(weighted).unsqueeze(0), first_output


@torch.no_grad()
def encode_one_prompt(text: str, tokenizers: list[Any], text_encoders: list[Any], device: str | torch.device,
                      clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeds (1, 77*N, C), pooled (1, P) or None) for one prompt. SD1.x: last_hidden_state (or the layer
    `clip_skip` picks). SDXL: each encoder's penultimate hidden states, weighted per encoder as A1111 does,
    then joined on channels."""
    if len(tokenizers) != len(text_encoders) or len(text_encoders) not in (1, 2):
        raise ValueError(f"need 1 (SD1.x) or 2 (SDXL) tokenizers and text encoders, got {len(tokenizers)} "
                         f"and {len(text_encoders)}")
    sdxl = len(text_encoders) == 2
    if sdxl and clip_skip != 1:
        raise ValueError(f"clip_skip {clip_skip} does not apply to SDXL (always the penultimate layers); allowed: 1")
    chunked = [chunk_prompt(text, tokenizer) for tokenizer in tokenizers]
    if len({len(c.input_ids) for c in chunked}) != 1:
        raise ValueError(f"the tokenizers split prompt {text!r} into different chunk counts")
    encoded = [encode_chunks(c, encoder, device, penultimate=sdxl, clip_skip=clip_skip)
               for c, encoder in zip(chunked, text_encoders)]
    embeds = torch.cat([e for e, _ in encoded], dim=-1).to(dtype=text_encoders[-1].dtype, device=device)
    if not sdxl:
        return embeds, None
    pooled = encoded[-1][1]
    if pooled.ndim != 2:
        raise ValueError("the second text encoder gives no pooled output; SDXL needs CLIPTextModelWithProjection")
    return embeds, pooled.to(device)


@dataclass(frozen=True)
class EncodedPrompts:
    """A batch of encoded prompts. `embeds` (B, 77*N, C): every prompt padded to the batch's largest chunk
    count with chunks encoding "" (A1111's "Pad conds"); `pooled` (B, P) for SDXL, None for SD1.x;
    `chunk_counts` the chunks each prompt needed before padding."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    chunk_counts: tuple[int, ...]

    @property
    def padded(self) -> bool:
        """Whether any prompt was padded with empty-prompt chunks."""
        return any(count * CHUNK_LENGTH != self.embeds.shape[1] for count in self.chunk_counts)


@torch.no_grad()
def encode_prompts(prompts: list[str], tokenizers: list[Any], text_encoders: list[Any],
                   device: str | torch.device, clip_skip: int = 1) -> EncodedPrompts:
    """Encode prompts as A1111 does (emphasis "Original", 75-token chunks joined on the token axis). Pass
    [tokenizer], [text_encoder] for SD1.x, or both of each in pipeline order for SDXL (`tasks.models.text_conditioning.text_encoders`)."""
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    encoded = [encode_one_prompt(p, tokenizers, text_encoders, device, clip_skip) for p in prompts]
    counts = tuple(e.shape[1] // CHUNK_LENGTH for e, _ in encoded)
    embeds = [e for e, _ in encoded]
    if len(set(counts)) > 1:
        empty = encode_one_prompt("", tokenizers, text_encoders, device, clip_skip)[0]
        embeds = [pad_with_empty_chunks(e, empty, max(counts) * CHUNK_LENGTH) for e in embeds]
    pooled = torch.cat([p for _, p in encoded]) if encoded[0][1] is not None else None
    return EncodedPrompts(torch.cat(embeds), pooled, counts)


def pad_with_empty_chunks(embeds: torch.Tensor, empty_chunk: torch.Tensor, length: int) -> torch.Tensor:
    """Append copies of the (1, 77, C) empty-prompt chunk to (B, L, C) embeds until they hold `length` tokens."""
    missing = length - embeds.shape[1]
    if missing < 0 or missing % CHUNK_LENGTH or empty_chunk.shape[1] != CHUNK_LENGTH:
        raise ValueError(f"cannot pad {embeds.shape[1]} tokens to {length} with {empty_chunk.shape[1]}-token chunks")
    copies = empty_chunk.to(embeds).expand(embeds.shape[0], -1, -1).repeat(1, missing // CHUNK_LENGTH, 1)
    return torch.cat([embeds, copies], dim=1)


def pad_to_same_length(a: torch.Tensor, b: torch.Tensor,
                       empty_chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the shorter of two embeddings with empty-prompt chunks (A1111 "Pad conds"), so positive and
    negative can go to the pipeline together: diffusers concatenates them for classifier-free guidance."""
    length = max(a.shape[1], b.shape[1])
    return pad_with_empty_chunks(a, empty_chunk, length), pad_with_empty_chunks(b, empty_chunk, length)


@dataclass(frozen=True)
class ConditioningPair:
    """Positive and negative conditioning of equal length for one pipeline call; `padded` says whether
    empty-prompt chunks were appended anywhere (A1111 writes "Pad conds: True" in that case)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None
    padded: bool

    def pipeline_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a diffusers SD1.x or SDXL pipeline call (given instead of prompt strings)."""
        kwargs = {"prompt_embeds": self.prompt_embeds, "negative_prompt_embeds": self.negative_prompt_embeds}
        if self.pooled_prompt_embeds is not None and self.negative_pooled_prompt_embeds is not None:
            kwargs["pooled_prompt_embeds"] = self.pooled_prompt_embeds
            kwargs["negative_pooled_prompt_embeds"] = self.negative_pooled_prompt_embeds
        return kwargs


@torch.no_grad()
def encode_prompt_pair(prompts: list[str], negative_prompts: list[str], tokenizers: list[Any],
                       text_encoders: list[Any], device: str | torch.device, *,
                       zero_empty_negative: bool = True, clip_skip: int = 1) -> ConditioningPair:
    """Encode prompts and negatives, padded to one length. For SDXL with every negative "" and
    `zero_empty_negative` (diffusers' force_zeros_for_empty_prompt, A1111's force_zero_embeddings), the
    negative is zeros shaped like the positive: zero keys attend uniformly to zero values, so any length gives
    the same result as A1111's unpadded 77 zeros."""
    if len(prompts) != len(negative_prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    positive = encode_prompts(prompts, tokenizers, text_encoders, device, clip_skip)
    if len(text_encoders) == 2 and zero_empty_negative and all(n == "" for n in negative_prompts):
        assert positive.pooled is not None
        return ConditioningPair(positive.embeds, torch.zeros_like(positive.embeds), positive.pooled,
                                torch.zeros_like(positive.pooled), positive.padded)
    negative = encode_prompts(negative_prompts, tokenizers, text_encoders, device, clip_skip)
    embeds, negative_embeds = positive.embeds, negative.embeds
    if embeds.shape[1] != negative_embeds.shape[1]:
        empty = encode_one_prompt("", tokenizers, text_encoders, device, clip_skip)[0]
        embeds, negative_embeds = pad_to_same_length(embeds, negative_embeds, empty)
    padded = positive.padded or negative.padded or embeds.shape[1] != positive.embeds.shape[1] \
        or negative_embeds.shape[1] != negative.embeds.shape[1]
    return ConditioningPair(embeds, negative_embeds, positive.pooled, negative.pooled, padded)
