"""LoRA behaviour on the tiny model: determinism, weight 0 equals no LoRA, save/reload fidelity,
a strong LoRA changes pixels, and the exact files each checkpoint writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tasks.data.dataset import scan_dataset
from tasks.lora.files import DIFFUSERS_FILE, checkpoint_files
from tasks.models.base_model import load_pipeline
from tasks.preflight import prepare_inputs
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import training_runs
from tasks.train.loop import fit_lora
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data

PROMPT = "a photo of zqx"


def render(pipe, seed: int = 7, steps: int = 4) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.0, width=64, height=64, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("behaviour")
    spec = parse_spec(small_sweep_data(out, ranks=[4], alpha=2.0, max_steps=30, checkpoint_steps=[30],
                                       learning_rate=2e-2))
    inputs = prepare_inputs(spec)
    run = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    return spec, inputs, run


@pytest.fixture(scope="module")
def trained(setup):
    """A strong LoRA trained in memory, and the same run trained and saved by the task."""
    _, inputs, run = setup
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    pipe.set_progress_bar_config(disable=True)
    items = scan_dataset(Path(inputs.dataset_path))
    fit_lora(pipe, run, items, device="cpu")
    result = train_lora(run)
    return pipe, result


def test_same_seed_gives_identical_pixels(tiny_pipeline) -> None:
    tiny_pipeline.set_progress_bar_config(disable=True)
    assert np.array_equal(render(tiny_pipeline, seed=3), render(tiny_pipeline, seed=3))
    assert not np.array_equal(render(tiny_pipeline, seed=3), render(tiny_pipeline, seed=4))


def test_weight_zero_equals_no_lora(trained, setup) -> None:
    _, inputs, _ = setup
    _, result = trained
    plain = load_pipeline(inputs.model_paths["tiny-sd15"])
    plain.set_progress_bar_config(disable=True)
    expected = render(plain)
    plain.load_lora_weights(result.checkpoints[-1].lora_dir, weight_name=DIFFUSERS_FILE, adapter_name="lora")
    plain.set_adapters(["lora"], adapter_weights=[0.0])
    assert np.array_equal(render(plain), expected)


def test_strong_lora_changes_the_image(trained, setup) -> None:
    _, inputs, _ = setup
    pipe, _ = trained
    plain = load_pipeline(inputs.model_paths["tiny-sd15"])
    plain.set_progress_bar_config(disable=True)
    assert np.abs(render(pipe) - render(plain)).max() > 0.05


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_saved_and_reloaded_lora_renders_like_the_trained_one(trained, setup, fmt: str) -> None:
    _, inputs, run = setup
    assert run.alpha != run.rank  # a lost alpha would change the scale and the pixels
    pipe, result = trained
    ckpt = result.checkpoints[-1]
    weight_name = DIFFUSERS_FILE if fmt == "diffusers" else f"{ckpt.checkpoint_id}.safetensors"
    fresh = load_pipeline(inputs.model_paths["tiny-sd15"])
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(ckpt.lora_dir, weight_name=weight_name, adapter_name="reloaded")
    np.testing.assert_allclose(render(fresh), render(pipe), atol=1e-5)


@pytest.fixture(scope="module")
def trained_everywhere(tmp_path_factory: pytest.TempPathFactory):
    """A strong LoRA on the resnet convolutions (locon) and the text encoder, in memory and saved."""
    out = tmp_path_factory.mktemp("locon-te")
    spec = parse_spec(small_sweep_data(out, ranks=[4], alpha=2.0, max_steps=30, checkpoint_steps=[30],
                                       learning_rate=2e-2, target_preset="locon", train_text_encoder=True))
    inputs = prepare_inputs(spec)
    run = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    pipe.set_progress_bar_config(disable=True)
    fit_lora(pipe, run, scan_dataset(Path(inputs.dataset_path)), device="cpu",
             on_checkpoint=lambda *state: None)
    return inputs, run, pipe, train_lora(run)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_locon_and_text_encoder_lora_reload_like_the_trained_one(trained_everywhere, fmt: str) -> None:
    inputs, run, pipe, result = trained_everywhere
    ckpt = result.checkpoints[-1]
    weight_name = DIFFUSERS_FILE if fmt == "diffusers" else f"{ckpt.checkpoint_id}.safetensors"
    fresh = load_pipeline(inputs.model_paths["tiny-sd15"])
    fresh.set_progress_bar_config(disable=True)
    plain_text = fresh.encode_prompt(PROMPT, "cpu", 1, False)[0]
    fresh.load_lora_weights(ckpt.lora_dir, weight_name=weight_name, adapter_name="reloaded")
    assert (fresh.encode_prompt(PROMPT, "cpu", 1, False)[0] - plain_text).abs().max() > 1e-3  # the TE LoRA loaded
    np.testing.assert_allclose(render(fresh), render(pipe), atol=1e-5)
    with safe_open(str(Path(ckpt.lora_dir) / f"{ckpt.checkpoint_id}.safetensors"), "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_unet_") and "resnets" in k and "conv" in k for k in keys)
    assert alphas == {run.alpha}


def test_weight_zero_turns_off_the_text_encoder_and_conv_lora_too(trained_everywhere) -> None:
    inputs, _, _, result = trained_everywhere
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    pipe.set_progress_bar_config(disable=True)
    expected = render(pipe)
    pipe.load_lora_weights(result.checkpoints[-1].lora_dir, weight_name=DIFFUSERS_FILE, adapter_name="lora")
    assert np.abs(render(pipe) - expected).max() > 0.05
    pipe.set_adapters(["lora"], adapter_weights=[0.0])  # as tasks.render.job does for the weight-0 column
    assert np.array_equal(render(pipe), expected)


def test_each_checkpoint_writes_exactly_its_files(trained) -> None:
    _, result = trained
    for ckpt in result.checkpoints:
        assert {p.name for p in Path(ckpt.lora_dir).iterdir()} == checkpoint_files(ckpt.checkpoint_id)


def test_kohya_file_has_real_alpha_and_metadata(trained, setup) -> None:
    _, _, run = setup
    _, result = trained
    ckpt = result.checkpoints[-1]
    with safe_open(str(Path(ckpt.lora_dir) / f"{ckpt.checkpoint_id}.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".lora_up.weight") for k in keys)
    assert alphas == {run.alpha}
    assert meta["ss_network_dim"] == str(run.rank) and meta["ss_network_alpha"] == str(run.alpha)


def test_finished_run_is_not_retrained(trained, setup) -> None:
    _, _, run = setup
    _, result = trained
    before = {p: p.stat().st_mtime_ns for c in result.checkpoints for p in Path(c.lora_dir).iterdir()}
    again = train_lora(run)
    assert again.checkpoints == result.checkpoints
    assert {p: p.stat().st_mtime_ns for p in before} == before


EVERY_OPTION = dict(lr_scheduler="cosine", lr_warmup_steps=3, gradient_accumulation_steps=2, lora_dropout=0.2,
                    min_snr_gamma=5.0, noise_offset=0.1, train_text_encoder=True, text_encoder_lr=5e-4,
                    target_preset="attention+ff", mixed_precision="bf16", gradient_checkpointing=True)


@pytest.mark.parametrize("options", [{}, EVERY_OPTION], ids=["defaults", "every-option"])
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path: Path, options: dict) -> None:
    from safetensors.torch import load_file

    spec = parse_spec(small_sweep_data(tmp_path, ranks=[2], alpha=3.0, max_steps=18, checkpoint_steps=[6, 12, 18],
                                       **options))
    inputs = prepare_inputs(spec)
    run = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    result = train_lora(run)
    last = Path(result.checkpoints[-1].lora_dir)
    uninterrupted = load_file(str(last / DIFFUSERS_FILE))
    earlier = {p: p.stat().st_mtime_ns for p in Path(result.checkpoints[0].lora_dir).iterdir()}
    import pyarrow.parquet as pq

    loss_file = tmp_path / "small" / "tables" / "losses" / f"{run.run_id}.parquet"
    uninterrupted_losses = pq.read_table(loss_file).to_pylist()

    # As if the process died after the step-12 checkpoint: the last checkpoint and the run's rows are gone.
    import shutil

    shutil.rmtree(last)
    for table in ("runs", "losses", "checkpoints"):
        (tmp_path / "small" / "tables" / table / f"{run.run_id}.parquet").unlink()
    resumed = train_lora(run)

    assert resumed.checkpoints == result.checkpoints
    again = load_file(str(last / DIFFUSERS_FILE))
    assert again.keys() == uninterrupted.keys()
    assert any(k.startswith("text_encoder.") for k in again) == bool(options)
    for key in uninterrupted:
        assert torch.equal(again[key], uninterrupted[key]), key
    assert {p: p.stat().st_mtime_ns for p in Path(result.checkpoints[0].lora_dir).iterdir()} == earlier
    losses = pq.read_table(loss_file).to_pylist()
    assert [row["step"] for row in losses] == list(range(1, 19))
    assert losses == uninterrupted_losses  # losses and the learning rate of every step, across the restart
    assert len({row["learning_rate"] for row in losses}) == (18 if options else 1)
