"""The SDXL family on the tiny SDXL model: it builds and loads as StableDiffusionXLPipeline, trains
through the same spec and code path as SD1.5, saves both LoRA formats (real alpha, SDXL metadata),
each reloads to the trained adapter's exact pixels, weight 0 equals no LoRA, and a render job
writes PNGs with A1111 metadata. With train_text_encoder both text encoders get LoRA (te1 and te2
in the kohya file), a killed run resumes bit for bit, and the validation loss is conditioned as
training is (pooled text, size ids)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from storage.layout import SweepLayout
from tasks.data.dataset import scan_dataset
from tasks.lora.files import DIFFUSERS_FILE, checkpoint_files
from tasks.models.base_model import load_pipeline, model_family, validate_base_model
from tasks.models.sd_scripts_names import sd_scripts_unet_modules
from tasks.models.single_file import write_config_folder
from tasks.models.tiny_sdxl import SDXL_BUILD_ENTRIES, SDXL_UNET_CONFIG
from tasks.preflight import InputError, prepare_inputs
from tasks.render.job import render_job
from tasks.render.png_metadata import read_png_parameters
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import render_jobs, training_runs
from tasks.train.loop import fit_lora
from tasks.train.run import train_lora
from tasks.train.state import load_training_state
from tasks.train.validation import prepare_validation, split_validation, validation_loss
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
    fit_lora(pipe, run, scan_dataset(Path(inputs.dataset_path)), device="cpu",
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


def test_sdxl_refuses_a_memory_preset_below_its_smallest_tier(tmp_path: Path) -> None:
    spec = parse_spec(sdxl_sweep(tmp_path, memory_preset_gib=6))  # fits an SD1.5 tier, not an SDXL one
    with pytest.raises(InputError) as error:
        prepare_inputs(spec)
    assert error.value.problems == ["base_models[0] (tiny-sdxl): training.memory_preset_gib = 6: 6 GiB is below the "
                                    "smallest sdxl preset (10 GiB); allowed: 10 GiB or more"]


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
    # sd-scripts' SDXL module names (sgm spelling: input_blocks_2_1_..., not down_blocks_1_attentions_0_...)
    assert {k.split(".")[0] for k in keys} == sd_scripts_unet_modules(SDXL_UNET_CONFIG, "sdxl", attention_only=True)
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


TE_LR = 2e-2


@pytest.fixture(scope="module")
def trained_te(setup):
    """LoRA on the UNet and both text encoders, 2 images held out for the validation loss: in memory
    by fit_lora, and the same run trained and saved by the task (checkpoints at steps 2 and 4)."""
    spec, inputs, _ = setup
    data = sdxl_sweep(Path(spec.output_dir), ranks=[2], alpha=3.0, max_steps=4, checkpoint_steps=[2, 4],
                      learning_rate=5e-2, train_text_encoder=True, text_encoder_lr=TE_LR, validation_images=2)
    run = training_runs(parse_spec(data), inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    pipe = fresh(inputs.model_paths["tiny-sdxl"])
    items, _ = split_validation(scan_dataset(Path(inputs.dataset_path)), 2, run.seed)
    fit_lora(pipe, run, items, device="cpu")
    return run, pipe, train_lora(run)


def lora_b(module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in get_peft_model_state_dict(module, adapter_name="default").items() if "lora_B" in k}


def test_sdxl_text_encoder_lora_trains_both_encoders_with_their_learning_rate(trained_te) -> None:
    run, pipe, result = trained_te
    first, second = lora_b(pipe.text_encoder), lora_b(pipe.text_encoder_2)
    assert any(v.abs().max() > 0 for v in first.values()) and any(v.abs().max() > 0 for v in second.values())
    # The pooled embedding comes from text_encoder_2's last layer, which the hidden states (penultimate) skip:
    # its LoRA moves only if the pooled path carries gradients.
    assert all(v.abs().max() > 0 for k, v in second.items() if "layers.1." in k)
    state = load_training_state(Path(result.checkpoints[-1].lora_dir))
    assert state["text_encoder_lora"].keys() == get_peft_model_state_dict(pipe.text_encoder).keys()
    assert state["text_encoder_2_lora"].keys() == get_peft_model_state_dict(pipe.text_encoder_2).keys()
    unet_group, text_group = state["optimizer"]["param_groups"]
    assert (unet_group["lr"], text_group["lr"]) == (run.learning_rate, TE_LR)
    assert len(text_group["params"]) == 2 * len(first) + 2 * len(second)  # A and B of every layer of both


def test_sdxl_text_encoder_lora_is_in_both_files_with_te1_and_te2_keys(trained_te) -> None:
    run, _, result = trained_te
    ckpt = result.checkpoints[-1]
    with safe_open(str(Path(ckpt.lora_dir) / DIFFUSERS_FILE), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    with safe_open(str(Path(ckpt.lora_dir) / f"{ckpt.checkpoint_id}.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert {k.split("_text_model")[0] for k in keys if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert not any(k.startswith("lora_te_") for k in keys)
    assert alphas == {run.alpha} != {float(run.rank)}
    assert meta["ss_network_train_unet_only"] == "False" and meta["ss_text_encoder_lr"] == str(TE_LR)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_saved_sdxl_text_encoder_lora_reloads_to_the_trained_pixels(trained_te, setup, fmt: str) -> None:
    _, inputs, _ = setup
    _, pipe, result = trained_te
    ckpt = result.checkpoints[-1]
    weight_name = DIFFUSERS_FILE if fmt == "diffusers" else f"{ckpt.checkpoint_id}.safetensors"
    reloaded = fresh(inputs.model_paths["tiny-sdxl"])
    plain = reloaded.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    reloaded.load_lora_weights(ckpt.lora_dir, weight_name=weight_name, adapter_name="reloaded")
    loaded = reloaded.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    # Both encoders' LoRA loaded: the hidden states (te1 and te2 halves) and te2's pooled embedding all moved.
    half = plain[0].shape[-1] // 2
    assert (loaded[0][..., :half] - plain[0][..., :half]).abs().max() > 1e-4
    assert (loaded[0][..., half:] - plain[0][..., half:]).abs().max() > 1e-4
    assert (loaded[2] - plain[2]).abs().max() > 1e-4
    np.testing.assert_allclose(render(reloaded), render(pipe), atol=1e-5)


def test_sdxl_validation_loss_is_measured_with_pooled_text_and_size_ids(trained_te, setup) -> None:
    _, inputs, _ = setup
    run, _, result = trained_te
    layout = SweepLayout(Path(run.sweep_root))
    rows = sorted(pq.read_table(layout.table_file("checkpoints", run.run_id)).to_pylist(), key=lambda r: r["step"])
    values = [r["validation_loss"] for r in rows]
    assert all(math.isfinite(v) for v in values) and values[0] != values[1], values
    # Fixed timesteps and noise: the reloaded final LoRA (UNet and both text encoders) measures the recorded value.
    _, held = split_validation(scan_dataset(Path(inputs.dataset_path)), 2, run.seed)
    pipe = fresh(inputs.model_paths["tiny-sdxl"])
    pipe.load_lora_weights(result.checkpoints[-1].lora_dir, weight_name=DIFFUSERS_FILE, adapter_name="v")
    validation = prepare_validation(pipe, held, run.resolution, run.seed, "cpu")
    assert validation.time_ids.shape == (2, 6)
    assert validation_loss(pipe, validation, "cpu") == pytest.approx(values[-1], rel=1e-4)
    pipe.set_adapters(["v"], adapter_weights=[0.0])  # and without the LoRA it differs
    assert validation_loss(pipe, validation, "cpu") != pytest.approx(values[-1], rel=1e-4)


def test_resumed_sdxl_text_encoder_run_ends_with_the_same_weights(trained_te) -> None:
    run, _, result = trained_te
    last = Path(result.checkpoints[-1].lora_dir)
    uninterrupted = load_file(str(last / DIFFUSERS_FILE))
    kohya = last / f"{result.checkpoints[-1].checkpoint_id}.safetensors"
    uninterrupted_kohya = load_file(str(kohya))
    layout = SweepLayout(Path(run.sweep_root))
    losses = pq.read_table(layout.table_file("losses", run.run_id)).to_pylist()
    # As if the process died after the step-2 checkpoint: the last checkpoint and the run's rows are gone.
    shutil.rmtree(last)
    for table in ("runs", "losses", "checkpoints"):
        layout.table_file(table, run.run_id).unlink()
    assert train_lora(run).checkpoints == result.checkpoints
    again = load_file(str(last / DIFFUSERS_FILE))
    assert again.keys() == uninterrupted.keys()
    assert all(torch.equal(again[k], v) for k, v in uninterrupted.items())
    assert all(torch.equal(load_file(str(kohya))[k], v) for k, v in uninterrupted_kohya.items())
    assert pq.read_table(layout.table_file("losses", run.run_id)).to_pylist() == losses
