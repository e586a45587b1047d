"""A1111 prompt handling: the parser's documented cases, 75-token chunking (comma wrap, BREAK), and
encoding that equals diffusers bit for bit on plain prompts and follows A1111 on weighted and long ones."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from tasks.data.dataset import load_clip_tokenizer
from tasks.models.base_model import load_pipeline
from tasks.models.text_conditioning import text_encoders
from tasks.models.tiny_sdxl import ensure_tiny_sdxl
from tasks.render.prompts import (
    PromptChunks,
    apply_emphasis,
    chunk_prompt,
    encode_prompt_pair,
    encode_prompts,
    pad_to_same_length,
    token_count,
)
from tasks.sweep.prompt_syntax import CHUNK_LENGTH, parse_prompt_attention, uses_a1111_syntax

BOS, EOS, COMMA = 49406, 49407, 267
# Single-token words, no commas: n of them make n prompt tokens.
WORDS = ["red", "blue", "green", "cat", "dog", "house", "tree", "sky", "sun", "moon", "car", "road"]


def words(n: int, offset: int = 0) -> list[str]:
    return [WORDS[(i + offset) % len(WORDS)] for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def sd15(tiny_model_dir: Path):
    return load_pipeline(str(tiny_model_dir))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory):
    return load_pipeline(str(ensure_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")))


def encode(pipe, prompts: list[str]):
    encoders, tokenizers = text_encoders(pipe)
    return encode_prompts(prompts, tokenizers, encoders, "cpu")


@pytest.mark.parametrize(("text", "expected"), [
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),  # the first "(" never closes
    ("a (cat: 1.5 ) b", [("a ", 1.0), ("cat", 1.5), (" b", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("a:1.2) b", [("a:1.2) b", 1.0)]),
    ("a] b)", [("a] b)", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_prompt_attention(text: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_prompt_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_parser_weights_multiply_as_a1111_floats() -> None:
    parsed = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert parsed["house"] == 1.5730000000000004 and parsed["sky"] == 1.4641000000000006
    assert parse_prompt_attention("(((sky)))") == [("sky", 1.3310000000000004)]


def test_parser_rejects_a_weight_that_is_no_number() -> None:
    with pytest.raises(ValueError, match="'1.2.3' is not a number"):
        parse_prompt_attention("(cat:1.2.3)")


@pytest.mark.parametrize(("text", "uses"), [
    ("a photo of a cat", False), ("photo: a cat", False), ("", False), ("a (cat)", True), ("a [cat]", True),
    ("(cat:1.0)", True), ("a BREAK b", True), ("\\(cat\\)", True),
])
def test_uses_a1111_syntax(text: str, uses: bool) -> None:
    assert uses_a1111_syntax(text) is uses


def content(chunks: PromptChunks, index: int) -> list[int]:
    """A chunk's prompt tokens: between BOS and the first EOS (the tokens here contain no EOS)."""
    ids = list(chunks.input_ids[index])
    return ids[1:ids.index(EOS)]


@pytest.mark.parametrize("n", [1, 74, 75, 76, 150, 151, 200])
def test_a_long_prompt_fills_75_token_chunks(tokenizer, n: int) -> None:
    chunks = chunk_prompt(" ".join(words(n)), tokenizer)
    assert len(chunks.input_ids) == math.ceil(n / 75)
    assert all(len(row) == CHUNK_LENGTH and row[0] == BOS for row in chunks.input_ids)
    assert sum(len(content(chunks, i)) for i in range(len(chunks.input_ids))) == n
    assert token_count(" ".join(words(n)), tokenizer) == n
    assert chunks.multipliers == tuple((1.0,) * CHUNK_LENGTH for _ in chunks.input_ids)


def test_an_empty_prompt_is_one_padding_chunk(tokenizer) -> None:
    chunks = chunk_prompt("", tokenizer)
    assert chunks.input_ids == ((BOS,) + (EOS,) * 76,)
    assert token_count("", tokenizer) == 0


def test_plain_prompt_ids_equal_the_tokenizers_own_padding(tokenizer) -> None:
    text = "a photo, of a cat"
    assert list(chunk_prompt(text, tokenizer).input_ids[0]) == tokenizer(
        text, padding="max_length", max_length=77).input_ids
    tokenizer_g = copy.deepcopy(load_clip_tokenizer())  # the loaded one is shared by the process
    tokenizer_g.pad_token = "!"  # the real SDXL tokenizer_2 pads with id 0
    ids = chunk_prompt(text, tokenizer_g).input_ids[0]
    assert list(ids) == tokenizer_g(text, padding="max_length", max_length=77).input_ids
    assert ids[7:] == (EOS,) + (0,) * 69


def test_weights_become_token_multipliers(tokenizer) -> None:
    chunks = chunk_prompt("a (cat:1.5) [dog]", tokenizer)
    assert content(chunks, 0) == tokenizer("a cat dog", add_special_tokens=False).input_ids
    assert chunks.multipliers[0][:5] == (1.0, 1.0, 1.5, 1 / 1.1, 1.0)


def test_segments_are_tokenized_separately(tokenizer) -> None:
    assert content(chunk_prompt("(wo)rd", tokenizer), 0) != content(chunk_prompt("word", tokenizer), 0)


def test_a_full_chunk_breaks_after_a_late_comma(tokenizer) -> None:
    chunks = chunk_prompt(" ".join(words(60)) + ", " + " ".join(words(20)), tokenizer)
    assert len(chunks.input_ids) == 2
    assert len(content(chunks, 0)) == 61 and content(chunks, 0)[-1] == COMMA
    assert len(content(chunks, 1)) == 20
    assert chunks.token_count == 75 + 20  # A1111 counts the wrapped chunk as 75


def test_an_early_comma_or_no_backtrack_means_a_hard_split(tokenizer) -> None:
    early = chunk_prompt(" ".join(words(50)) + ", " + " ".join(words(30)), tokenizer)
    assert [len(content(early, i)) for i in range(2)] == [75, 6]
    late = " ".join(words(60)) + ", " + " ".join(words(20))
    assert [len(content(chunk_prompt(late, tokenizer, comma_backtrack=0), i)) for i in range(2)] == [75, 6]
    with pytest.raises(ValueError, match="comma_backtrack"):
        chunk_prompt(late, tokenizer, comma_backtrack=75)


def test_break_starts_a_new_chunk(tokenizer) -> None:
    chunks = chunk_prompt("a cat BREAK a dog", tokenizer)
    assert [content(chunks, i) for i in range(2)] == [[320, 2368], [320, 1929]]
    assert chunks.token_count == 75 + 2
    assert len(chunk_prompt("cat BREAK", tokenizer).input_ids) == 1
    leading = chunk_prompt("BREAK cat", tokenizer)
    assert len(leading.input_ids) == 2 and content(leading, 0) == []
    assert len(chunk_prompt("(cat BREAK dog)", tokenizer).input_ids) == 1  # weighted BREAK is text


def test_plain_prompt_equals_diffusers_sd15(sd15) -> None:
    prompt = "a photo of a cat, high quality"
    expected = sd15.encode_prompt(prompt, "cpu", 1, False)[0]
    encoded = encode(sd15, [prompt])
    assert torch.equal(encoded.embeds, expected)
    assert encoded.pooled is None and encoded.chunk_counts == (1,) and not encoded.padded


def test_plain_prompt_equals_diffusers_sdxl(sdxl) -> None:
    prompt = "a photo of a cat, high quality"
    embeds, _, pooled, _ = sdxl.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    encoded = encode(sdxl, [prompt])
    assert torch.equal(encoded.embeds, embeds) and torch.equal(encoded.pooled, pooled)


def test_emphasis_scales_tokens_and_restores_the_mean() -> None:
    z, multipliers = torch.randn(77, 8) + 0.5, torch.ones(77)
    assert apply_emphasis(z, multipliers) is z
    multipliers[3] = 1.5
    weighted = apply_emphasis(z, multipliers)
    assert weighted.mean().item() == pytest.approx(z.mean().item(), rel=1e-5)
    assert torch.allclose(weighted[3] / weighted[0], 1.5 * z[3] / z[0], rtol=1e-4)


@pytest.fixture()
def shifted_sd15(sd15):
    """The tiny SD1.5 with a final LayerNorm bias of 0.5 (restored afterwards): with its zero bias every
    token's mean is ~0, so the mean-restoring rescale would divide noise by noise."""
    bias = getattr(sd15.text_encoder, "text_model", sd15.text_encoder).final_layer_norm.bias  # transformers 4 or 5
    original = bias.detach().clone()
    with torch.no_grad():
        bias.add_(0.5)
    yield sd15
    with torch.no_grad():
        bias.copy_(original)


def test_sdxl_pooled_comes_from_the_first_chunk_only(sdxl) -> None:
    first, whole = encode(sdxl, [" ".join(words(75))]), encode(sdxl, [" ".join(words(150))])
    assert whole.embeds.shape[1] == 154 and torch.equal(whole.pooled, first.pooled)
    assert torch.equal(whole.embeds[:, :77], first.embeds)


@pytest.mark.parametrize("family", ["shifted_sd15", "sdxl"])
def test_weights_change_embeddings_but_keep_their_mean(family: str, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(family)
    plain, weighted = encode(pipe, ["a cat on a mat"]), encode(pipe, ["a (cat:1.5) on a mat"])
    assert not torch.equal(plain.embeds, weighted.embeds)
    # SDXL weights each encoder on its own (A1111 runs two embedders), so each half keeps its own mean.
    width = plain.embeds.shape[-1] // (2 if family == "sdxl" else 1)
    for part in (slice(0, width), slice(width, None)) if family == "sdxl" else (slice(None),):
        assert weighted.embeds[..., part].mean().item() == pytest.approx(plain.embeds[..., part].mean().item(),
                                                                         rel=1e-5)
    if family == "sdxl":
        assert torch.equal(weighted.pooled, plain.pooled)  # pooled is taken before emphasis


def test_a_200_token_prompt_is_three_chunks_that_all_count(sd15) -> None:
    prompt = " ".join(words(200))
    changed = " ".join(words(120) + ["pizza"] + words(79, offset=121))
    long, other = encode(sd15, [prompt]), encode(sd15, [changed])
    assert long.embeds.shape == (1, 231, sd15.text_encoder.config.hidden_size) and long.chunk_counts == (3,)
    assert torch.equal(long.embeds[:, :77], other.embeds[:, :77])  # the change sits in chunk 2
    assert not torch.equal(long.embeds[:, 77:154], other.embeds[:, 77:154])


def test_a_batch_is_padded_with_empty_prompt_chunks(sd15) -> None:
    batch = encode(sd15, ["a cat", " ".join(words(100))])
    assert batch.embeds.shape[:2] == (2, 154) and batch.chunk_counts == (1, 2) and batch.padded
    assert torch.equal(batch.embeds[:1, :77], encode(sd15, ["a cat"]).embeds)
    assert torch.equal(batch.embeds[:1, 77:], encode(sd15, [""]).embeds)


def test_pad_to_same_length() -> None:
    a, b, empty = torch.randn(1, 77, 8), torch.randn(1, 231, 8), torch.randn(1, 77, 8)
    padded_a, padded_b = pad_to_same_length(a, b, empty)
    assert padded_a.shape == padded_b.shape == (1, 231, 8) and torch.equal(padded_b, b)
    assert torch.equal(padded_a[:, :77], a) and torch.equal(padded_a[:, 154:], empty)
    with pytest.raises(ValueError, match="cannot pad"):
        pad_to_same_length(torch.randn(1, 80, 8), b, empty)


def test_sd15_pair_pads_the_negative_and_runs_the_pipeline(sd15) -> None:
    encoders, tokenizers = text_encoders(sd15)
    short = encode_prompt_pair(["a cat"], [""], tokenizers, encoders, "cpu")
    assert torch.equal(short.negative_prompt_embeds, sd15.encode_prompt("a cat", "cpu", 1, True, "")[1])
    assert not short.padded and set(short.pipeline_kwargs()) == {"prompt_embeds", "negative_prompt_embeds"}
    pair = encode_prompt_pair([" ".join(words(100))], ["blurry"], tokenizers, encoders, "cpu")
    assert pair.prompt_embeds.shape == pair.negative_prompt_embeds.shape and pair.prompt_embeds.shape[1] == 154
    assert pair.padded
    latents = sd15(**pair.pipeline_kwargs(), num_inference_steps=1, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8)


def test_sdxl_empty_negative_is_zeros_of_the_positive_length(sdxl) -> None:
    encoders, tokenizers = text_encoders(sdxl)
    pair = encode_prompt_pair([" ".join(words(100))], [""], tokenizers, encoders, "cpu")
    assert pair.prompt_embeds.shape[1] == 154 and not pair.padded
    assert torch.equal(pair.negative_prompt_embeds, torch.zeros_like(pair.prompt_embeds))
    assert torch.equal(pair.negative_pooled_prompt_embeds, torch.zeros_like(pair.pooled_prompt_embeds))
    latents = sdxl(**pair.pipeline_kwargs(), num_inference_steps=1, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8)
    encoded = encode_prompt_pair(["a cat"], ["blurry"], tokenizers, encoders, "cpu")
    assert encoded.negative_pooled_prompt_embeds.abs().sum() > 0


def test_encoder_count_must_be_one_or_two(sd15) -> None:
    with pytest.raises(ValueError, match="1 \\(SD1.x\\) or 2 \\(SDXL\\)"):
        encode_prompts(["cat"], [sd15.tokenizer] * 3, [sd15.text_encoder] * 3, "cpu")
