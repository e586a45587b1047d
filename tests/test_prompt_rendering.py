"""Prompts as AUTOMATIC1111 reads them, in real renders: long prompts in 75-token chunks, emphasis and
BREAK change the image; plain short prompts keep their pixels and image ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.preflight import prepare_inputs
from tasks.render.job import render_job
from tasks.render.png_metadata import parse_parameters, read_png_parameters
from tasks.sweep.cells import grid_cells, image_id
from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.plan import render_jobs, training_runs
from tests.conftest import small_sweep_data

WORDS = ("red circle blue square green triangle yellow star on a grey field, soft light, "
         "painted with thick strokes, high contrast, ") * 6
LONG = f"zqx, {WORDS}and at the very end a (bright magenta:1.4) border"
SHORT = "a photo of zqx"


def render_baseline(out: Path, syntax: str, prompts: list[str], negative: str = "blurry"):
    data = small_sweep_data(out)
    data["render"] |= {"prompts": prompts, "seeds": [3], "samplers": ["Euler"], "steps": [3],
                       "negative_prompt": negative, "prompt_syntax": syntax}
    spec = parse_spec(data)
    inputs = prepare_inputs(spec)
    runs = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)
    job = render_jobs(spec, inputs.model_paths, [], runs, inputs.dataset_path)[0]
    rows = {r["prompt"]: r for r in pq.read_table(render_job(job)).to_pylist()}
    return job, rows


def pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(row["path"]), dtype=np.int16)


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("prompts")
    return {syntax: render_baseline(out / syntax, syntax, [SHORT, LONG]) for syntax in ("a1111", "plain")}


def test_a_long_weighted_prompt_renders_differently_from_its_first_77_tokens(renders) -> None:
    (_, a1111), (_, plain) = renders["a1111"], renders["plain"]
    assert a1111[LONG]["image_id"] != plain[LONG]["image_id"]
    assert np.abs(pixels(a1111[LONG]) - pixels(plain[LONG])).max() > 0
    assert a1111[LONG]["prompt_tokens"] > 150 and a1111[LONG]["prompt_syntax"] == "a1111"
    assert plain[LONG]["prompt_tokens"] > 75 and plain[LONG]["prompt_syntax"] == "plain"


def test_a_plain_short_prompt_keeps_its_image_id_and_pixels(renders, tmp_path: Path) -> None:
    (job, a1111), (_, plain) = renders["a1111"], renders["plain"]
    assert a1111[SHORT]["image_id"] == plain[SHORT]["image_id"]
    cell = next(c for c in grid_cells(job) if c.prompt == SHORT)
    assert image_id(job, cell) == a1111[SHORT]["image_id"]
    # Rendered in the same batches, the pixels are the same too (a batch's size changes CPU rounding).
    prompts = [SHORT, "zqx, a blue square"]
    same = [render_baseline(tmp_path / syntax, syntax, prompts)[1] for syntax in ("a1111", "plain")]
    for prompt in prompts:
        assert same[0][prompt]["image_id"] == same[1][prompt]["image_id"]
        assert np.array_equal(pixels(same[0][prompt]), pixels(same[1][prompt]))


def test_the_png_infotext_is_what_a1111_needs_to_render_it_again(renders) -> None:
    (_, a1111), (_, plain) = renders["a1111"], renders["plain"]
    text = parse_parameters(read_png_parameters(a1111[LONG]["path"])[0])
    assert text["Prompt"] == LONG and text["RNG"] == "CPU"
    assert text["Pad conds"] == "True"  # the 3-chunk prompt against a 1-chunk negative
    assert "Emphasis" not in text  # A1111's default, "Original"
    short = parse_parameters(read_png_parameters(a1111[SHORT]["path"])[0])
    assert "Pad conds" not in short
    assert parse_parameters(read_png_parameters(plain[LONG]["path"])[0])["Emphasis"] == "None"


def test_emphasis_and_break_change_the_image(tmp_path: Path) -> None:
    prompts = ["zqx, a red circle", "zqx, a (red:1.6) circle", "zqx, a red BREAK circle"]
    _, rows = render_baseline(tmp_path, "a1111", prompts)
    images = [pixels(rows[p]) for p in prompts]
    assert np.abs(images[0] - images[1]).max() > 0 and np.abs(images[0] - images[2]).max() > 0
    assert len({rows[p]["image_id"] for p in prompts}) == 3


def test_plain_syntax_warns_before_work_that_a_long_prompt_is_cut(tmp_path: Path, capsys) -> None:
    data = small_sweep_data(tmp_path)
    data["render"] |= {"prompts": [LONG], "prompt_syntax": "plain"}
    prepare_inputs(parse_spec(data))
    assert "warning: render.prompts[0] has " in capsys.readouterr().out


def test_a_weight_that_is_no_number_is_refused_before_work(tmp_path: Path) -> None:
    data = small_sweep_data(tmp_path)
    data["render"] |= {"prompts": ["zqx (cat:1.2.3)"]}
    with pytest.raises(SpecError, match=r"render: prompts\[0\]: prompt weight '1.2.3' is not a number"):
        parse_spec(data)
    data["render"]["prompt_syntax"] = "plain"  # then the text is only text
    parse_spec(data)
