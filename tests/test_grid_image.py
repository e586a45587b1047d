"""Labelled X/Y grid images: one file per z combination, cells where their axis values say, idempotent."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tasks.render.grid_image import (
    MAX_CELLS_WIDTH_PX,
    MISSING_COLOR,
    cell_size,
    drawable_text,
    grid_layout,
    job_title,
    plan_grid_files,
    plan_grids,
    plan_layout,
    read_grid_metadata,
    wrap_text,
    write_grid_images,
)

WEIGHTS = (0.5, 1.0)
SAMPLERS = ("Euler a", "DPM++ 2M Karras", "UniPC")
SEEDS = (1, 2)
SIZE = 64
TITLE = "tiny-sd15 · rank 4 · step 200"


def _colour(weight: float, sampler: str, seed: int) -> tuple[int, int, int]:
    """A colour unique to each cell, so a pixel tells which image landed where."""
    return (40 + 100 * WEIGHTS.index(weight), 30 + 70 * SAMPLERS.index(sampler), 60 + 120 * SEEDS.index(seed))


@pytest.fixture()
def job_images(tmp_path: Path) -> list[dict]:
    """Image rows of one render job (weights listed high to low, to check they sort) with solid PNGs."""
    rows = []
    for weight in reversed(WEIGHTS):
        for sampler in SAMPLERS:
            for seed in SEEDS:
                image_id = f"w{weight}-{SAMPLERS.index(sampler)}-s{seed}"
                path = tmp_path / "images" / f"{image_id}.png"
                path.parent.mkdir(exist_ok=True)
                Image.new("RGB", (SIZE, SIZE), _colour(weight, sampler, seed)).save(path)
                rows.append({
                    "image_id": image_id, "base_model": "tiny-sd15", "checkpoint_id": "ck", "rank": 4,
                    "checkpoint_step": 200, "sampler": sampler, "steps": 20, "cfg_scale": 7.0, "lora_weight": weight,
                    "prompt_index": 0, "prompt": "a photo of zqx", "seed": seed, "width": SIZE, "height": SIZE,
                    "path": str(path),
                })
    return rows


def _centre(box: tuple[int, int, int, int]) -> tuple[int, int]:
    return ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)


def test_one_grid_per_z_combination_named_before_rendering(job_images: list[dict], tmp_path: Path) -> None:
    out = tmp_path / "grids"
    planned = plan_grid_files(job_images, out)
    assert not out.exists()  # planning draws and writes nothing
    paths = write_grid_images(job_images, out, title=TITLE)
    assert paths == planned
    assert len(set(paths)) == len(SEEDS)  # steps, CFG and prompt are fixed; seed varies
    assert sorted(out.iterdir()) == sorted(paths)  # no temp files left behind
    assert all(p.name.startswith("grid-") and p.suffix == ".png" for p in paths)


def test_grid_is_title_header_and_row_labels_around_the_cells(job_images: list[dict], tmp_path: Path) -> None:
    for plan, path in zip(plan_grids(job_images, tmp_path), write_grid_images(job_images, tmp_path, title=TITLE)):
        layout = plan_layout(plan, TITLE)
        assert (layout.cell_w, layout.cell_h) == (2 * SIZE, 2 * SIZE)  # 64 px upscaled to >= 128
        assert layout.title_h > 0 and layout.header_h > 0 and layout.left_w > 0
        with Image.open(path) as image:
            assert image.size == (
                layout.left_w + len(WEIGHTS) * layout.cell_w,
                layout.title_h + layout.header_h + len(SAMPLERS) * layout.cell_h,
            )
            rgb = image.convert("RGB")
        for i in range(len(WEIGHTS)):  # each column label is drawn (dark pixels) inside its header box
            left, top, right, _ = layout.cell_box(i, 0)
            header = rgb.crop((left, top - layout.header_h, right, top)).convert("L")
            assert header.getextrema()[0] < 100


def test_each_cell_shows_the_image_of_its_axis_values(job_images: list[dict], tmp_path: Path) -> None:
    plans = plan_grids(job_images, tmp_path)
    write_grid_images(job_images, tmp_path, title=TITLE)
    for plan in plans:
        assert plan.x_values == WEIGHTS and plan.y_values == SAMPLERS
        seed = dict(plan.z_values)["seed"]
        layout = plan_layout(plan, TITLE)
        with Image.open(plan.path) as image:
            for i, weight in enumerate(WEIGHTS):
                for j, sampler in enumerate(SAMPLERS):
                    assert image.convert("RGB").getpixel(_centre(layout.cell_box(i, j))) == _colour(
                        weight, sampler, seed
                    )


def test_rerun_rewrites_nothing(job_images: list[dict], tmp_path: Path) -> None:
    first = write_grid_images(job_images, tmp_path, title=TITLE)
    stamps = {p: p.stat().st_mtime_ns for p in first}
    assert write_grid_images(job_images, tmp_path, title=TITLE) == first
    assert {p: p.stat().st_mtime_ns for p in first} == stamps


def test_missing_cell_is_blank_grey(job_images: list[dict], tmp_path: Path) -> None:
    def is_gone(r: dict) -> bool:
        return r["lora_weight"] == 1.0 and r["sampler"] == "UniPC" and r["seed"] == 2

    rows = [r for r in job_images if not is_gone(r)]
    plans = {dict(p.z_values)["seed"]: p for p in plan_grids(rows, tmp_path)}
    write_grid_images(rows, tmp_path, title=TITLE)
    cell = _centre(plan_layout(plans[2], TITLE).cell_box(1, 2))
    with Image.open(plans[2].path) as image:
        assert image.convert("RGB").getpixel(cell) == MISSING_COLOR
    with Image.open(plans[1].path) as image:  # the other seed's grid still has that cell
        assert image.convert("RGB").getpixel(cell) == _colour(1.0, "UniPC", 1)
    assert read_grid_metadata(plans[2].path)["image_ids"][2][1] is None


def test_text_chunk_round_trips(job_images: list[dict], tmp_path: Path) -> None:
    paths = write_grid_images(job_images, tmp_path, title=job_title(job_images[0]))
    meta = read_grid_metadata(paths[0])
    assert meta == {
        "title": "tiny-sd15 · rank 4 · step 200 · 20 steps · CFG 7 · seed 1 · prompt: a photo of zqx",
        "x_axis": "lora_weight", "x_values": list(WEIGHTS), "y_axis": "sampler", "y_values": list(SAMPLERS),
        "z": {"steps": 20, "cfg_scale": 7.0, "prompt_index": 0, "seed": 1},
        "image_ids": [[f"w{w}-{j}-s1" for w in WEIGHTS] for j in range(len(SAMPLERS))],
    }


def test_unicode_and_long_prompts_draw_without_failing(job_images: list[dict], tmp_path: Path) -> None:
    assert drawable_text("café  naïve\nStraße — 日本", 16) == "cafe naive Strasse - ??"
    prompt = "zqx " + "supercalifragilistic" * 5 + " “quoted” 日本語の風景 " * 10
    rows = [{**r, "prompt": prompt, "sampler": r["sampler"] + " ünïcödé"} for r in job_images]
    paths = write_grid_images(rows, tmp_path, title=TITLE, x_axis="prompt_index", z_axes=("lora_weight", "seed"))
    assert len(paths) == len(WEIGHTS) * len(SEEDS)
    lines = wrap_text(prompt, 16, 120, 3)
    assert len(lines) == 3 and lines[-1].endswith("…")
    assert all(drawable_text(line, 16) == line for line in lines)


def test_large_images_shrink_to_fit_4096_px() -> None:
    assert cell_size(512, 512, 2) == (512, 512)
    cell_w, cell_h = cell_size(1024, 768, 8)
    assert 8 * cell_w <= MAX_CELLS_WIDTH_PX and cell_w / cell_h == pytest.approx(1024 / 768, rel=0.01)
    layout = grid_layout([f"weight {i}" for i in range(8)], ["DPM++ 2M SDE Karras"], "title", (1024, 768))
    assert layout.size[0] <= 4096


def test_bad_axes_are_reported_together(job_images: list[dict], tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        plan_grids(job_images, tmp_path, x_axis="weight", z_axes=("steps", "sampler", "nope"))
    message = str(err.value)
    assert "'weight'" in message and "'nope'" in message and "'sampler' is used more than once" in message
    with pytest.raises(ValueError, match="more than one image.*seed"):
        plan_grids(job_images, tmp_path, z_axes=("steps",))
