"""A1111 `parameters` text: exact format, round trips, A1111-written input, bad input, real PNG files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.render.png_metadata import (
    ImageParameters,
    format_parameters,
    parse_image_parameters,
    parse_parameters,
    png_info,
    read_png_parameters,
)

BASE = ImageParameters(
    prompt="a photo of sks dog, sitting", negative_prompt="blurry, lowres", steps=20, sampler="DPM++ 2M",
    schedule_type="Karras", cfg_scale=7.0, seed=123, width=512, height=512, model_hash="abcdef1234",
    model_name="tiny-sd15", loras=(("ckpt-0400", 0.8, "0123456789ab"),), version="lora-sweep 0.1.0", extra={},
)


def test_format_is_a1111s_layout() -> None:
    assert format_parameters(BASE) == (
        "a photo of sks dog, sitting <lora:ckpt-0400:0.8>\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, "
        'Model hash: abcdef1234, Model: tiny-sd15, Lora hashes: "ckpt-0400: 0123456789ab", Version: lora-sweep 0.1.0'
    )


def test_empty_negative_prompt_and_absent_values_are_left_out() -> None:
    text = format_parameters(dataclasses.replace(BASE, negative_prompt="", loras=(), model_hash=None, version=None))
    assert text == (
        "a photo of sks dog, sitting\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, Model: tiny-sd15"
    )


ROUND_TRIPS = {
    "plain": BASE,
    "no negative prompt": dataclasses.replace(BASE, negative_prompt=""),
    "empty prompt": dataclasses.replace(BASE, prompt=""),
    "empty prompt and LoRA": dataclasses.replace(BASE, prompt="", negative_prompt=""),
    "multi-line prompts": dataclasses.replace(BASE, prompt="line one, a: b\nline two", negative_prompt="bad\nworse"),
    "several LoRAs, one unhashed": dataclasses.replace(
        BASE, loras=(("a", 0.0, "111111111111"), ("b_2", -1.25, None), ("c.v1", 1.0, "222222222222"))),
    "no LoRA": dataclasses.replace(BASE, loras=()),
    "quoted values": dataclasses.replace(
        BASE, model_name='sd "v1.5", pruned: fp16', cfg_scale=7.5, sampler="Euler a", schedule_type="Automatic",
        extra={"Note": 'commas, "quotes" and: colons', "Multi line": "a\nb", "Empty": "", "Padded": " x "}),
    "non-Latin-1 text": dataclasses.replace(BASE, prompt="一只猫, café ☕", negative_prompt="ぼやけた"),
}


@pytest.mark.parametrize("params", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_format_then_parse_gives_the_parameters_back(params: ImageParameters) -> None:
    assert parse_image_parameters(format_parameters(params)) == params


def test_parse_returns_a1111_keys_and_unquoted_strings() -> None:
    params = dataclasses.replace(BASE, model_name="my, model", extra={"Note": "x: y"})
    parsed = parse_parameters(format_parameters(params))
    assert parsed == {
        "Prompt": "a photo of sks dog, sitting <lora:ckpt-0400:0.8>", "Negative prompt": "blurry, lowres",
        "Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": "123",
        "Size": "512x512", "Model hash": "abcdef1234", "Model": "my, model",
        "Lora hashes": "ckpt-0400: 0123456789ab", "Note": "x: y", "Version": "lora-sweep 0.1.0",
    }


def test_reads_what_a1111_writes() -> None:
    text = (
        "masterpiece, 1girl, (smile:1.2) <lora:add_detail:0.5>\n"
        "Negative prompt: (worst quality:1.4), lowres\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 965400086, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "add_detail: 7c6bad76eb54", '
        "Clip skip: 2, Version: v1.10.1"
    )
    params = parse_image_parameters(text)
    assert params.prompt == "masterpiece, 1girl, (smile:1.2)"
    assert params.negative_prompt == "(worst quality:1.4), lowres"
    assert (params.steps, params.sampler, params.schedule_type, params.cfg_scale) == (25, "DPM++ 2M", "Karras", 6.5)
    assert (params.seed, params.width, params.height) == (965400086, 512, 768)
    assert params.loras == (("add_detail", 0.5, "7c6bad76eb54"),)
    assert params.extra == {"Clip skip": "2"}


def test_pre_1_9_text_without_schedule_type_reads_as_automatic() -> None:
    params = parse_image_parameters("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512")
    assert (params.sampler, params.schedule_type) == ("Euler a", "Automatic")
    assert (params.loras, params.negative_prompt) == ((), "")


def test_a_last_line_with_fewer_than_three_settings_is_prompt() -> None:
    parsed = parse_parameters("a cat\nstyle: oil, light: soft")
    assert parsed == {"Prompt": "a cat\nstyle: oil, light: soft", "Negative prompt": ""}


def test_missing_settings_are_all_named() -> None:
    with pytest.raises(ValueError) as err:
        parse_image_parameters("a cat\nSteps: 20, Sampler: Euler, Model: x")
    assert all(f"missing setting '{key}'" in str(err.value) for key in ("CFG scale", "Seed", "Size"))


def test_every_unwritable_value_is_reported_at_once() -> None:
    bad = dataclasses.replace(
        BASE, prompt="a cat\nNegative prompt: dogs <lora:x:1>", cfg_scale=float("nan"),
        loras=(("bad:name", 1.0, None), ("ok", float("inf"), None)), extra={"Seed": "1", "x": "y", "a:b": "c"},
    )
    with pytest.raises(ValueError) as err:
        format_parameters(bad)
    message = str(err.value)
    for fragment in (
        "prompt: a line starts with 'Negative prompt:'", "prompt: contains a <lora:...> tag",
        "name 'bad:name'", "weight inf of 'ok'", "cfg_scale: nan", "key 'Seed'", "key 'x'", "key 'a:b'",
    ):
        assert fragment in message, fragment


def _write_png(path: Path, params: ImageParameters, ids: dict[str, object]) -> None:
    pixels = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    Image.fromarray(pixels).save(path, format="PNG", pnginfo=png_info(params, ids))


@pytest.mark.parametrize("params", [BASE, ROUND_TRIPS["non-Latin-1 text"]], ids=["latin-1", "unicode"])
def test_chunks_survive_saving_and_loading_a_png(tmp_path: Path, params: ImageParameters) -> None:
    ids = {"run_id": "r1", "checkpoint_id": "c2", "image_id": "i3", "render_s": 0.25, "checkpoint": None}
    path = tmp_path / "image.png"
    _write_png(path, params, ids)
    text, ours = read_png_parameters(path)
    assert text == format_parameters(params)
    assert parse_image_parameters(text) == params
    assert ours == ids
    with Image.open(path) as image:
        assert image.size == (8, 8)


def test_a_png_without_our_chunks_reads_as_none_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    assert read_png_parameters(path) == (None, {})


def test_a_non_png_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (4, 4)).save(path, format="JPEG")
    with pytest.raises(ValueError, match="not a PNG"):
        read_png_parameters(path)
