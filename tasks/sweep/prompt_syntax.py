"""AUTOMATIC1111's prompt syntax, parsed without torch: `(x)`, `[x]`, `(x:1.3)`, escapes and BREAK.

The parser follows A1111 v1.10's `prompt_parser.parse_prompt_attention`; tasks.render.prompts turns
the parsed segments into weighted, 75-token-chunked CLIP conditioning. The plan uses it here, without
torch, to tell which prompts render differently under A1111 syntax than as plain text.
"""

from __future__ import annotations

import re
from typing import Any

CHUNK_TOKENS = 75  # prompt tokens per chunk; each chunk is BOS + 75 + EOS
CHUNK_LENGTH = CHUNK_TOKENS + 2
ROUND_FACTOR = 1.1  # (x)
SQUARE_FACTOR = 1 / 1.1  # [x]
BREAK_WEIGHT = -1.0  # ("BREAK", -1.0) marks a forced chunk break in the parsed prompt
COMMA_TOKEN = ",</w>"

# One alternative per token kind, tried in A1111's order; together they match any character.
ATTENTION_TOKEN = re.compile(r"""
      \\[()\[\]\\]              # escaped bracket or backslash: the character itself
    | \\                        # any other backslash: dropped
    | \(
    | \[
    | :\s*([+-]?[.\d]+)\s*\)    # explicit weight closing a round bracket
    | \)
    | \]
    | [^\\()\[\]:]+             # plain text
    | :
""", re.VERBOSE)
BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into (text, weight) segments: (x) x1.1, [x] /1.1, (x:w) xw, escapes literal,
    BREAK as ("BREAK", -1.0), unclosed brackets applying to the rest, equal neighbours merged."""
    segments: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []
    for match in ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            segments.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(segments))
        elif token == "[":
            square_open.append(len(segments))
        elif weight is not None and round_open:
            multiply_from(segments, round_open.pop(), parse_weight(weight, text))
        elif token == ")" and round_open:
            multiply_from(segments, round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            multiply_from(segments, square_open.pop(), SQUARE_FACTOR)
        else:  # plain text, or a closing token with nothing open: kept literally
            append_text(segments, token)
    for start in round_open:
        multiply_from(segments, start, ROUND_FACTOR)
    for start in square_open:
        multiply_from(segments, start, SQUARE_FACTOR)
    return merge_equal_weights(segments or [["", 1.0]])


def parse_weight(weight: str, text: str) -> float:
    """The number in `(x:weight)`; the lexer accepts runs like `1.2.3` that are no number."""
    try:
        return float(weight)
    except ValueError:
        raise ValueError(f"prompt weight {weight!r} is not a number in prompt {text!r}") from None


def multiply_from(segments: list[list[Any]], start: int, factor: float) -> None:
    """Multiply the weight of every segment from `start` on (everything since a bracket opened)."""
    for segment in segments[start:]:
        segment[1] *= factor


def append_text(segments: list[list[Any]], text: str) -> None:
    """Append plain text, with a BREAK marker wherever the word BREAK stands (its spaces swallowed)."""
    for index, part in enumerate(BREAK_SPLIT.split(text)):
        if index > 0:
            segments.append(["BREAK", BREAK_WEIGHT])
        segments.append([part, 1.0])


def merge_equal_weights(segments: list[list[Any]]) -> list[tuple[str, float]]:
    """Join neighbouring segments whose weights are exactly equal, as A1111 does."""
    merged: list[tuple[str, float]] = []
    for text, weight in segments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


def uses_a1111_syntax(text: str) -> bool:
    """True when A1111 parsing changes the prompt: a weight other than 1, a BREAK or an escape."""
    return parse_prompt_attention(text) != [(text, 1.0)]


def is_break(segment: tuple[str, float]) -> bool:
    """A BREAK marker; a BREAK inside brackets had its weight multiplied and is plain text instead."""
    return segment[0] == "BREAK" and segment[1] == BREAK_WEIGHT


def may_render_differently(text: str) -> bool:
    """Whether a prompt can condition differently under A1111 syntax than as plain text: it uses the
    syntax, or it may be longer than one 75-token chunk. Byte-level BPE gives at least one byte per
    token, so a prompt of at most 75 UTF-8 bytes is always one chunk."""
    return uses_a1111_syntax(text) or len(text.encode()) > CHUNK_TOKENS
