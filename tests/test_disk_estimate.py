"""The estimate of what a sweep writes (tasks/disk_space.py, tasks/lora/size.py) covers what it really
writes, and a sweep that would not fit is refused before any work, with the numbers."""

from __future__ import annotations

import os
from collections import namedtuple
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tasks import preflight
from tasks.disk_space import estimate_sweep_bytes, grid_cell_bytes, image_bytes
from tasks.lora.files import DIFFUSERS_FILE
from tasks.lora.size import checkpoint_bytes, text_encoder_lora_widths, unet_lora_widths
from tasks.preflight import InputError, prepare_inputs
from tasks.render.job import render_job
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import render_jobs, training_runs
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data

DiskUsage = namedtuple("DiskUsage", "total used free")


@pytest.mark.parametrize("options", [{}, {"target_preset": "locon", "train_text_encoder": True}],
                         ids=["attention", "locon+text-encoder"])
def test_checkpoint_estimate_counts_the_lora_exactly_and_covers_the_folder(tmp_path: Path, options: dict) -> None:
    spec = parse_spec(small_sweep_data(tmp_path, ranks=[3], max_steps=2, checkpoint_steps=[2], **options))
    inputs = prepare_inputs(spec)
    [run] = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)
    folder = Path(train_lora(run).checkpoints[0].lora_dir)
    model = Path(run.base_model_path)
    width, _ = unet_lora_widths(model / "unet" / "config.json", tuple(run.target_modules))
    text_width = text_encoder_lora_widths(model)[0] if options else 0
    saved = load_file(str(folder / DIFFUSERS_FILE))
    assert sum(t.numel() for t in saved.values()) == run.rank * (width + text_width)
    written = sum(p.stat().st_size for p in folder.iterdir())
    assert written <= checkpoint_bytes(run) <= written + 512 * 2**10


def test_image_estimate_counts_every_planned_image_and_covers_a_rendered_job(tmp_path: Path) -> None:
    spec = parse_spec(small_sweep_data(tmp_path))
    inputs = prepare_inputs(spec)
    estimate = estimate_sweep_bytes(spec, inputs)
    render = spec.render
    cells = len(render.samplers) * len(render.steps) * len(render.cfg_scales) * len(render.prompts) * len(render.seeds)
    assert estimate.image_count == cells * (1 + 2 * 2)  # the baseline, then 2 ranks x 2 checkpoints at weight 1.0
    assert estimate.checkpoint_count == 4 and estimate.already_written == 0

    runs = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)
    [baseline] = render_jobs(spec, inputs.model_paths, [], runs, inputs.dataset_path)
    render_job(baseline)
    pngs = sum(p.stat().st_size for p in (tmp_path / "small" / "images").rglob("*.png"))
    assert pngs <= cells * (image_bytes(64, 64) + 1.5 * grid_cell_bytes(64, 64))


def test_a_sweep_too_big_for_the_free_space_is_refused_with_the_numbers(tmp_path: Path, monkeypatch) -> None:
    data = small_sweep_data(tmp_path / "out")
    data["render"].update(width=1024, height=1024, seeds=list(range(20)))
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12, 300 * 2**20))
    with pytest.raises(InputError) as info:
        prepare_inputs(parse_spec(data))
    message = str(info.value)
    assert f"output_dir '{tmp_path / 'out'}': the sweep needs about" in message
    assert "only 300.0 MiB is free (4 checkpoint(s)" in message and "400 image(s) with their grids" in message
    assert "0.0 MiB of it already written, 200.0 MiB kept free" in message and "make the sweep smaller" in message
    assert not (tmp_path / "out").exists()  # refused: nothing left behind


def test_a_rerun_needs_room_only_for_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    data = small_sweep_data(tmp_path / "out")
    data["render"].update(width=1024, height=1024, seeds=list(range(20)))
    written = tmp_path / "out" / "small" / "images" / "earlier.png"
    written.parent.mkdir(parents=True)
    with open(written, "wb") as handle:  # as if the earlier run had written it all (sparse: no real bytes)
        handle.truncate(8 * 2**30)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12, 300 * 2**20))
    assert prepare_inputs(parse_spec(data)).num_images > 0
    os.remove(written)
