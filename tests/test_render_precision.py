"""Render precision: "auto" is fp32 on the CPU (ids unchanged), bf16 renders reproducibly and close
to fp32, weight 0 still equals no LoRA in bf16, and fp16 without CUDA is refused before any work."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from storage.layout import SweepLayout
from tasks.lora.files import DIFFUSERS_FILE
from tasks.models.base_model import load_pipeline
from tasks.preflight import InputError, prepare_inputs
from tasks.render.job import render_job
from tasks.sweep.cells import grid_cells, image_id
from tasks.sweep.devices import resolve_precision
from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.plan import render_jobs, training_runs
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data

GRID = {"prompts": ["a photo of {trigger}"], "seeds": [1, 2], "samplers": ["Euler a"], "steps": [4],
        "lora_weights": [0.0, 1.0], "cfg_scales": [7.0], "width": 64, "height": 64}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """A small trained checkpoint, and the render jobs of the same sweep at each precision."""
    out = tmp_path_factory.mktemp("precision")

    def spec_at(precision: str | None):
        data = small_sweep_data(out, ranks=[2], max_steps=4, checkpoint_steps=[4], learning_rate=2e-2)
        data["render"] = {**GRID, **({"precision": precision} if precision else {})}
        return parse_spec(data)

    spec = spec_at(None)
    inputs = prepare_inputs(spec)
    run = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    checkpoints = list(train_lora(run).checkpoints)
    jobs = {p: render_jobs(spec_at(p), inputs.model_paths, checkpoints, [run], inputs.dataset_path)
            for p in (None, "fp32", "bf16")}
    return inputs, checkpoints, jobs


def pixels(job) -> dict[str, np.ndarray]:
    rows = pq.read_table(render_job(job)).to_pylist()
    return {row["image_id"]: np.asarray(Image.open(row["path"]), dtype=np.float64) for row in rows}


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto renders fp16 on CUDA (the gpu test below)")
def test_auto_renders_fp32_on_the_cpu_with_the_ids_it_had_before(world) -> None:
    _, _, jobs = world
    auto, fp32 = jobs[None][0], jobs["fp32"][0]
    assert auto.precision == "auto" and resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "fp16"
    assert auto.render_id != fp32.render_id  # an explicit precision is part of the job's id
    cells = grid_cells(auto)
    assert [image_id(auto, c) for c in cells] == [image_id(fp32, c) for c in cells]  # "auto" and fp32: same ids
    rows = pq.read_table(render_job(auto)).to_pylist()
    assert {row["precision"] for row in rows} == {"fp32"}


def test_bf16_renders_reproducibly_close_to_fp32_with_their_own_ids(world) -> None:
    _, _, jobs = world
    fp32 = pixels(jobs["fp32"][1])
    job = jobs["bf16"][1]
    first = pixels(job)
    assert not set(first) & set(fp32)  # bf16 images are other images
    layout = SweepLayout(Path(job.sweep_root))
    layout.table_file("images", job.render_id).unlink()
    shutil.rmtree(layout.render_dir(job.render_id))
    again = pixels(job)
    assert again.keys() == first.keys() and all(np.array_equal(again[k], first[k]) for k in first)
    rows = pq.read_table(layout.table_file("images", job.render_id)).to_pylist()
    assert {row["precision"] for row in rows} == {"bf16"}
    # Same cells in the same order: the mean absolute difference from fp32 stays small (0-255 scale;
    # measured 1.1 and 1.2 on the tiny model).
    diffs = [np.abs(a - b).mean() for a, b in zip(first.values(), fp32.values(), strict=True)]
    assert max(diffs) < 4, diffs


def test_weight_zero_equals_no_lora_in_bf16(world) -> None:
    inputs, checkpoints, _ = world
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"], torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)

    def render() -> np.ndarray:
        return pipe("a photo of zqx", num_inference_steps=4, width=64, height=64, output_type="np",
                    generator=torch.Generator().manual_seed(3)).images[0]

    plain = render()
    pipe.load_lora_weights(checkpoints[-1].lora_dir, weight_name=DIFFUSERS_FILE, adapter_name="lora")
    pipe.set_adapters(["lora"], adapter_weights=[0.0])
    assert np.array_equal(render(), plain)
    pipe.set_adapters(["lora"], adapter_weights=[1.0])
    assert not np.array_equal(render(), plain)


def test_fp16_without_cuda_and_bad_values_are_refused_before_any_work(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is allowed")
    data = small_sweep_data(tmp_path)
    data["render"]["precision"] = "fp16"
    with pytest.raises(InputError, match=r"render.precision = 'fp16' needs a CUDA GPU .* allowed here: 'auto'"):
        prepare_inputs(parse_spec(data))
    assert not (tmp_path / "small").exists()
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")
    data["render"]["precision"] = "half"
    with pytest.raises(SpecError, match=r"render.precision: got 'half'; .*'auto', 'fp32', 'fp16' or 'bf16'"):
        parse_spec(data)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_renders_fp16_on_cuda_close_to_fp32(world) -> None:
    _, _, jobs = world
    auto, fp32 = jobs[None][1], jobs["fp32"][1]
    half = pixels(auto)
    rows = pq.read_table(SweepLayout(Path(auto.sweep_root)).table_file("images", auto.render_id)).to_pylist()
    assert {row["precision"] for row in rows} == {"fp16"}
    full = pixels(fp32)
    assert not set(half) & set(full)
    diffs = [np.abs(a - b).mean() for a, b in zip(half.values(), full.values(), strict=True)]
    assert max(diffs) < 4, diffs
