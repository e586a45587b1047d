"""The SDXL family on the tiny SDXL model: it builds and loads as StableDiffusionXLPipeline, trains
through the same spec and code path as SD1.5, saves both LoRA formats (real alpha, SDXL metadata),
each reloads to the trained adapter's exact pixels, weight 0 equals no LoRA, and a render job
writes PNGs with A1111 metadata."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

from tasks.base_model import load_pipeline, model_family, validate_base_model
from tasks.checkpoint_io import DIFFUSERS_FILE, checkpoint_files
from tasks.dataset import scan_dataset
from tasks.inputs import InputError, prepare_inputs
from tasks.plan import render_jobs, training_runs
from tasks.png_metadata import read_png_parameters
from tasks.render import render_job
from tasks.spec import parse_spec
from tasks.tiny_model import write_config_folder
from tasks.tiny_sdxl import SDXL_BUILD_ENTRIES
from tasks.train import fit_lora, train_lora
from tests.conftest import small_sweep_data

PROMPT = "a photo of zqx"
SDXL = {"name": "tiny-sdxl", "path": "builtin:tiny-sdxl"}


def render(pipe, seed: int = 7, steps: int = 4) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.0, width=64, height=64, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def sdxl_sweep(out: Path, **training: object) -> dict:
    data = small_sweep_data(out, **training)
    data["base_models"] = [dict(SDXL)]
    return data


def fresh(path: str):
    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("sdxl")
    spec = parse_spec(sdxl_sweep(out, ranks=[2], alpha=3.0, max_steps=4, checkpoint_steps=[4], learning_rate=5e-2))
    inputs = prepare_inputs(spec)
    run = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    return spec, inputs, run


@pytest.fixture(scope="module")
def trained(setup):
    """The LoRA trained in memory by fit_lora, and the same run trained and saved by the task."""
    _, inputs, run = setup
    pipe = fresh(inputs.model_paths["tiny-sdxl"])
    fit_lora(pipe, run, scan_dataset(Path(inputs.dataset_path)), device="cpu", losses=[],
             on_checkpoint=lambda *state: None)
    return pipe, train_lora(run)


def test_tiny_sdxl_builds_and_loads_as_an_sdxl_pipeline(setup, tiny_model_dir: Path, tmp_path: Path) -> None:
    _, inputs, _ = setup
    folder = Path(inputs.model_paths["tiny-sdxl"])
    assert {p.name for p in folder.iterdir()} == SDXL_BUILD_ENTRIES
    assert validate_base_model(str(folder)) == []
    assert model_family(str(folder)) == "sdxl" and model_family(str(tiny_model_dir)) == "sd15"
    pipe = fresh(str(folder))
    assert type(pipe) is StableDiffusionXLPipeline
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.vae.config.scaling_factor == 0.13025
    assert render(pipe).shape == (64, 64, 3)
    assert np.array_equal(render(pipe, seed=3), render(pipe, seed=3))
    # A single file's family comes from its config= folder.
    config = write_config_folder(folder, tmp_path / "sdxl-config")
    assert model_family(str(tmp_path / "model.safetensors"), str(config)) == "sdxl"
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    [problem] = validate_base_model(str(broken))
    assert "text_encoder_2/" in problem and "SDXL" in problem


def test_sdxl_refuses_options_it_does_not_support_yet(tmp_path: Path) -> None:
    spec = parse_spec(sdxl_sweep(tmp_path, train_text_encoder=True, validation_images=1))
    with pytest.raises(InputError) as error:
        prepare_inputs(spec)
    problems = error.value.problems
    assert len(problems) == 2 and all(p.startswith("base_models[0] (tiny-sdxl): ") for p in problems)
    assert "training.train_text_encoder = True is not supported for SDXL" in problems[0]
    assert "training.validation_images = 1 is not supported for SDXL" in problems[1]


def test_training_saves_both_formats_with_sdxl_metadata(trained, setup) -> None:
    _, _, run = setup
    _, result = trained
    [ckpt] = result.checkpoints
    folder = Path(ckpt.lora_dir)
    assert {p.name for p in folder.iterdir()} == checkpoint_files(ckpt.checkpoint_id)
    with safe_open(str(folder / DIFFUSERS_FILE), "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())
    with safe_open(str(folder / f"{ckpt.checkpoint_id}.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys) and alphas == {run.alpha} != {float(run.rank)}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_sd_model_name"] == "tiny-sdxl"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "3.0"


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_saved_sdxl_lora_reloads_to_the_trained_pixels(trained, setup, fmt: str) -> None:
    _, inputs, _ = setup
    pipe, result = trained
    ckpt = result.checkpoints[-1]
    weight_name = DIFFUSERS_FILE if fmt == "diffusers" else f"{ckpt.checkpoint_id}.safetensors"
    reloaded = fresh(inputs.model_paths["tiny-sdxl"])
    plain = render(reloaded)
    reloaded.load_lora_weights(ckpt.lora_dir, weight_name=weight_name, adapter_name="reloaded")
    expected = render(pipe)
    assert np.abs(expected - plain).max() > 0.01  # the adapter does something, so equality means something
    np.testing.assert_allclose(render(reloaded), expected, atol=1e-5)


def test_sdxl_weight_zero_equals_no_lora(trained, setup) -> None:
    _, inputs, _ = setup
    _, result = trained
    pipe = fresh(inputs.model_paths["tiny-sdxl"])
    expected = render(pipe)
    pipe.load_lora_weights(result.checkpoints[-1].lora_dir, weight_name=DIFFUSERS_FILE, adapter_name="lora")
    pipe.set_adapters(["lora"], adapter_weights=[0.0])
    assert np.array_equal(render(pipe), expected)


def test_sdxl_render_job_writes_pngs_with_a1111_metadata(trained, setup) -> None:
    spec, inputs, run = setup
    _, result = trained
    jobs = render_jobs(spec, inputs.model_paths, list(result.checkpoints), [run], inputs.dataset_path)
    job = jobs[1].model_copy(update={"samplers": ("Euler a", "DPM++ 2M Karras"), "steps": (2,), "seeds": (1,),
                                     "baseline_render_id": None})
    rows = pq.read_table(render_job(job)).to_pylist()
    assert len(rows) == 2 * len(job.lora_weights) * len(job.prompts)
    assert {r["sampler"] for r in rows} == {"Euler a", "DPM++ 2M Karras"}
    for row in rows:
        parameters, ours = read_png_parameters(row["path"])
        assert parameters.startswith(row["prompt"]) and "Size: 64x64" in parameters and "Model: tiny-sdxl" in parameters
        assert f'Lora hashes: "{result.checkpoints[-1].checkpoint_id}: ' in parameters
        assert ours["image_id"] == row["image_id"]
