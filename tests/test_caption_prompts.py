"""Issue 22: render.caption_prompts, training captions rendered and compared with their own images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage.catalog import Manifest, build_catalog, connect
from storage.layout import SweepLayout
from tasks.data.dataset import MIN_IMAGE_SIDE
from tasks.data.sources import load_dataset
from tasks.preflight import InputError, prepare_inputs
from tasks.render.job import render_job
from tasks.score.caption_fidelity import caption_metrics
from tasks.score.image_features import TrainingSetFeatures
from tasks.score.job import score_job
from tasks.sweep.caption_prompts import draw_caption_prompts, escape_a1111
from tasks.sweep.cells import grid_cells, image_id
from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.plan import render_jobs
from tasks.sweep.prompt_syntax import parse_prompt_attention
from tasks.train.validation import split_validation
from tests.conftest import small_sweep_data

ITEMS = [(f"img{i}-hash", f"/data/img{i}.png", f"zqx, caption {i}") for i in range(10)]


def spec_data(out: Path, *, validation_images: int = 2, seed: int = 0, **render: object) -> dict:
    data = small_sweep_data(out, validation_images=validation_images, seed=seed)
    data["render"].update({"seeds": [1], "samplers": ["Euler"], "steps": [2], "lora_weights": [0.0, 1.0], **render})
    return data


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("captions")
    return out, prepare_inputs(parse_spec(spec_data(out, caption_prompts="all")))


def test_held_out_captions_always_join_and_n_trained_ones_are_drawn_by_seed() -> None:
    held = {"img3-hash", "img7-hash"}
    drawn = draw_caption_prompts(ITEMS, held, 3, seed=0, prompt_syntax="plain")
    assert [c.source_id for c in drawn if c.held_out] == ["img3-hash", "img7-hash"]
    assert len([c for c in drawn if not c.held_out]) == 3
    assert drawn == draw_caption_prompts(ITEMS, held, 3, seed=0, prompt_syntax="plain")
    assert drawn != draw_caption_prompts(ITEMS, held, 3, seed=1, prompt_syntax="plain")
    everything = draw_caption_prompts(ITEMS, held, "all", seed=0, prompt_syntax="plain")
    assert [c.source_id for c in everything] == [i for i, _, _ in ITEMS]  # dataset order
    assert [c.prompt for c in everything] == [caption for _, _, caption in ITEMS]


def test_captions_that_cannot_be_drawn_are_refused() -> None:
    with pytest.raises(ValueError, match="render.caption_prompts = 9 exceeds the 8 trained images; allowed: 1 to 8"):
        draw_caption_prompts(ITEMS, {"img3-hash", "img7-hash"}, 9, seed=0, prompt_syntax="plain")
    missing = [*ITEMS[:2], ("img9-hash", "/data/img9.png", "")]
    with pytest.raises(ValueError, match=r"1 image\(s\) have no caption \(/data/img9.png\)"):
        draw_caption_prompts(missing, set(), "all", seed=0, prompt_syntax="plain")


def test_a1111_reads_an_escaped_caption_as_the_text_training_saw() -> None:
    caption = r"zqx (smiling) [sic] a\b"
    assert parse_prompt_attention(escape_a1111(caption)) == [(caption, 1.0)]
    [drawn] = draw_caption_prompts([("a-1", "/a.png", caption)], set(), "all", seed=0, prompt_syntax="a1111")
    assert drawn.prompt == escape_a1111(caption)


@pytest.mark.parametrize("value", [0, -2, "some", 2.5, True])
def test_bad_caption_prompts_are_refused_at_spec_time(tmp_path: Path, value: object) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_data(tmp_path, caption_prompts=value))
    assert (f"render.caption_prompts: got {value!r}; allowed: 'all' or a number of trained captions to draw "
            "(1 or more)") in str(info.value)


def test_more_captions_than_trained_images_are_refused_before_work(world, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="render.caption_prompts = 11 exceeds the 10 trained images; allowed: 1 to 10"):
        prepare_inputs(parse_spec(spec_data(tmp_path, caption_prompts=11)))


def test_held_out_marks_follow_the_split_training_makes(world) -> None:
    out, inputs = world
    spec = parse_spec(spec_data(out, caption_prompts="all"))
    # tasks.train.run's own scan and split
    items = load_dataset(spec.dataset, Path(inputs.dataset_path), min_size=min(MIN_IMAGE_SIDE, 64)).items
    _, held = split_validation(items, 2, 0)
    assert [c.source_id for c in inputs.caption_prompts] == [i.image_id for i in items]
    assert {c.source_id for c in inputs.caption_prompts if c.held_out} == {i.image_id for i in held}
    assert [c.prompt for c in inputs.caption_prompts] == [i.caption for i in items]


def test_spec_prompts_keep_their_image_ids_and_captions_on_equal_text_stay_apart(world) -> None:
    out, inputs = world
    plain = render_jobs(parse_spec(spec_data(out)), inputs.model_paths, [], [], inputs.dataset_path)[0]
    with_captions = render_jobs(parse_spec(spec_data(out, caption_prompts="all")), inputs.model_paths, [], [],
                                inputs.dataset_path, inputs.caption_prompts)[0]
    assert plain.render_id != with_captions.render_id
    spec_ids = {image_id(plain, c) for c in grid_cells(plain)}
    cells = grid_cells(with_captions)
    assert {image_id(with_captions, c) for c in cells if c.caption is None} == spec_ids
    captioned = [image_id(with_captions, c) for c in cells if c.caption]
    # every demo caption is the same text: one image per source image all the same
    assert len({c.prompt for c in inputs.caption_prompts}) == 1 and len(set(captioned)) == len(captioned) == 12


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_render_of_its_own_source_scores_perfectly(world) -> None:
    _, inputs = world
    source = inputs.caption_prompts[0]
    training = TrainingSetFeatures.from_images([c.source_id for c in inputs.caption_prompts],
                                               [pixels(c.source_path) for c in inputs.caption_prompts])
    values = {v.metric: v for v in caption_metrics(pixels(source.source_path), source.source_id, training)}
    assert values["caption_ssim"].value == pytest.approx(1.0)
    assert values["caption_color_chi2"].value == 0.0 and values["caption_texture_lbp_chi2"].value == 0.0
    assert {v.reference_id for v in values.values()} == {source.source_id}
    other = caption_metrics(pixels(source.source_path), inputs.caption_prompts[1].source_id, training)
    assert next(v.value for v in other if v.metric == "caption_ssim") < 1.0


def test_caption_images_are_rendered_marked_scored_and_queryable(world) -> None:
    out, inputs = world
    spec = parse_spec(spec_data(out, caption_prompts=3, lora_weights=[0.0]))
    layout = SweepLayout(Path(spec.output_dir) / spec.name)
    resolved = prepare_inputs(spec).caption_prompts
    [job] = render_jobs(spec, inputs.model_paths, [], [], inputs.dataset_path, resolved)
    rows = pq.read_table(render_job(job)).to_pylist()
    score_job(job)
    captioned = [r for r in rows if r["prompt_source"] == "caption"]
    assert [r["prompt_source"] for r in rows].count("spec") == 1 and len(captioned) == 5
    assert [(r["source_image"], r["held_out"]) for r in captioned] == [(c.source_id, c.held_out) for c in resolved]
    assert [r["prompt_index"] for r in captioned] == [1, 2, 3, 4, 5]
    first = pixels(captioned[0]["path"]).astype(int)
    # one text, one seed: the same image (to 1 level: a batch's float sums may differ by position on the CPU)
    assert max(np.abs(pixels(r["path"]) - first).max() for r in captioned) <= 1
    build_catalog(layout, Manifest(spec.sweep_id(), (), (job.render_id,)))
    with connect(layout) as con:
        found = con.execute("SELECT i.held_out, m.reference_id = i.source_image, count(*) FROM image_metrics m "
                            "JOIN images i USING (image_id) WHERE m.metric LIKE 'caption_%' GROUP BY ALL "
                            "ORDER BY ALL").fetchall()
        ssim = con.execute("SELECT count(DISTINCT value) FROM image_metrics WHERE metric = 'caption_ssim'").fetchone()
    assert found == [(False, True, 9), (True, True, 6)]  # 3 metrics each: 3 trained images, 2 held out
    assert ssim == (5,)  # same render, five different source images


@pytest.mark.slow
def test_demo_world_trained_captions_gain_fidelity_and_held_out_ones_do_not(tmp_path: Path) -> None:
    """sweeps/demo-captions.toml through bench.caption_fidelity (the README's measured table)."""
    from bench.caption_fidelity import run_sweep

    rows = {(r["step"], r["weight"], r["held_out"]): r for r in run_sweep(tmp_path)}
    gain = {key: row["ssim_gain"] for key, row in rows.items()}
    steps = sorted({step for step, _, _ in rows if step is not None})
    assert len(steps) == 3 and rows[(None, 0.0, False)]["images"] == 27 and rows[(None, 0.0, True)]["images"] == 9
    for step in steps:
        assert gain[(step, 1.0, False)] > gain[(step, 1.0, True)]  # memorisation apart from generalisation
        assert gain[(step, 0.5, False)] > 0  # any weight brings trained captions closer
        assert gain[(step, 1.0, True)] <= 0  # a held-out caption's image is no closer than without the LoRA
    for step in steps[1:]:  # at the first checkpoint weights 0.5 and 1 tie (+0.010 each)
        assert gain[(step, 1.0, False)] > gain[(step, 0.5, False)]  # rising with weight
    assert gain[(steps[1], 1.0, False)] > gain[(steps[0], 1.0, False)]  # and with step, to its best checkpoint
    assert rows[(steps[1], 1.0, False)]["color_chi2"] < rows[(None, 0.0, False)]["color_chi2"]
