"""Issue 22: render.clip_skip, an axis of the grid written as A1111 writes it ("Clip skip: 2")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from storage.layout import SweepLayout
from tasks.models.text_conditioning import encode_captions, text_encoders
from tasks.preflight import InputError, prepare_inputs
from tasks.render.job import render_job
from tasks.render.png_metadata import parse_image_parameters, read_png_parameters
from tasks.render.prompts import encode_prompt_pair
from tasks.sweep.cells import grid_cells, image_id
from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.plan import planned_runs, render_jobs
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data


def spec_data(out: Path, **render: object) -> dict:
    data = small_sweep_data(out, ranks=[2], max_steps=2, checkpoint_steps=[2], learning_rate=1e-2)
    data["render"].update({"seeds": [1], "samplers": ["Euler"], "steps": [2], "lora_weights": [0.0, 1.0],
                           "negative_prompt": "blurry", **render})
    return data


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("clip_skip")
    return out, prepare_inputs(parse_spec(spec_data(out)))


def baseline(world, **render: object):
    out, inputs = world
    return render_jobs(parse_spec(spec_data(out, **render)), inputs.model_paths, [], [], inputs.dataset_path)[0]


@pytest.mark.parametrize("value, allowed", [([0], "greater than or equal to 1"), ([13], "less than or equal to 12"),
                                            ([1, 1], "repeat"), ([], "at least 1")])
def test_bad_clip_skip_is_refused_at_spec_time(tmp_path: Path, value: list[int], allowed: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_data(tmp_path, clip_skip=value))
    assert "render.clip_skip" in str(info.value) and allowed in str(info.value)


def test_clip_skip_one_keeps_every_id_and_two_adds_images(world) -> None:
    plain, explicit, both = baseline(world), baseline(world, clip_skip=[1]), baseline(world, clip_skip=[1, 2])
    assert explicit.render_id == plain.render_id and both.render_id != plain.render_id
    ids = {image_id(plain, c) for c in grid_cells(plain)}
    assert {image_id(explicit, c) for c in grid_cells(explicit)} == ids
    by_skip = {s: {image_id(both, c) for c in grid_cells(both) if c.clip_skip == s} for s in (1, 2)}
    assert by_skip[1] == ids and len(by_skip[2]) == len(ids) and not by_skip[2] & ids


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("syntax, prompt", [("plain", "a photo of {trigger}"), ("a1111", "a photo of ({trigger}:1.3)")])
def test_clip_skip_two_renders_differently_and_the_png_says_so(world, syntax: str, prompt: str) -> None:
    job = baseline(world, clip_skip=[1, 2], prompt_syntax=syntax, prompts=[prompt])
    default = baseline(world, prompt_syntax=syntax, prompts=[prompt])
    rows = {r["clip_skip"]: r for r in pq.read_table(render_job(job)).to_pylist()}
    [before] = pq.read_table(render_job(default)).to_pylist()
    assert np.array_equal(pixels(rows[1]["path"]), pixels(before["path"]))  # clip skip 1: the pixels of before
    assert np.abs(pixels(rows[2]["path"]).astype(int) - pixels(rows[1]["path"])).max() > 0
    parsed = {s: parse_image_parameters(read_png_parameters(rows[s]["path"])[0]).extra for s in (1, 2)}
    assert parsed[2]["Clip skip"] == "2" and "Clip skip" not in parsed[1]  # A1111 writes it only above 1


def test_a1111_and_plain_encode_clip_skip_two_alike(tiny_pipeline) -> None:
    encoders, tokenizers = text_encoders(tiny_pipeline)
    prompts, negatives = ["a photo of zqx"], ["blurry"]
    pair = encode_prompt_pair(prompts, negatives, tokenizers, encoders, "cpu", clip_skip=2)
    assert torch.equal(pair.prompt_embeds, encode_captions(prompts, encoders, tokenizers, "cpu", clip_skip=2)[0])
    assert torch.equal(pair.negative_prompt_embeds, encode_captions(negatives, encoders, tokenizers, "cpu",
                                                                    clip_skip=2)[0])
    last = encode_prompt_pair(prompts, negatives, tokenizers, encoders, "cpu")
    assert not torch.equal(pair.negative_prompt_embeds, last.negative_prompt_embeds)  # the negative is skipped too


def test_sdxl_refuses_render_clip_skip_before_work(tmp_path: Path) -> None:
    data = spec_data(tmp_path, clip_skip=[1, 2])
    data["base_models"] = [{"name": "tiny-sdxl", "path": "builtin:tiny-sdxl"}]
    with pytest.raises(InputError) as info:
        prepare_inputs(parse_spec(data))
    assert ("render.clip_skip [1, 2] on base_models[0] (tiny-sdxl): SDXL always conditions on its text encoders' "
            "penultimate layers and A1111 ignores Clip skip for it; allowed: [1]") in str(info.value)


def test_training_and_rendering_at_clip_skip_two_record_it_in_both_places(world, tmp_path: Path) -> None:
    _, inputs = world
    data = spec_data(tmp_path, clip_skip=[2], lora_weights=[1.0])
    data["training"]["clip_skip"] = 2
    spec = parse_spec(data)
    [run] = planned_runs(spec, inputs)
    [ckpt] = train_lora(run).checkpoints
    [job] = [j for j in render_jobs(spec, inputs.model_paths, [ckpt], [run], inputs.dataset_path) if j.checkpoint]
    [row] = pq.read_table(render_job(job)).to_pylist()
    layout = SweepLayout(Path(run.sweep_root))
    assert pq.read_table(layout.table_file("runs", run.run_id)).to_pylist()[0]["clip_skip"] == 2
    with safe_open(str(Path(ckpt.lora_dir) / f"{ckpt.checkpoint_id}.safetensors"), "pt") as kohya:
        assert kohya.metadata()["ss_clip_skip"] == "2"
    assert row["clip_skip"] == 2
    assert parse_image_parameters(read_png_parameters(row["path"])[0]).extra["Clip skip"] == "2"


def test_clip_skip_beyond_the_text_encoders_layers_is_refused_before_work(world, tmp_path: Path) -> None:
    _, inputs = world
    layers = json.loads((Path(inputs.model_paths["tiny-sd15"]) / "text_encoder" / "config.json").read_text())
    layers = layers["num_hidden_layers"]
    with pytest.raises(InputError) as info:
        prepare_inputs(parse_spec(spec_data(tmp_path, clip_skip=[1, layers + 1])))
    assert (f"render.clip_skip {layers + 1} on base_models[0] (tiny-sd15): its text encoder has {layers} layers; "
            f"allowed: 1 to {layers}") in str(info.value)
