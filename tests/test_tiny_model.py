"""The embedded tiny SD1.5 model: real tokenizer, real x8 VAE, seeded and deterministic, single-file round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from tasks.models.base_model import load_pipeline
from tasks.models.build_clip_tokenizer import ASSET_DIR, CHECK_IDS, CHECK_TEXT, VOCAB_SIZE
from tasks.models.single_file import (
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
    write_config_folder,
    write_single_file_checkpoint,
)
from tasks.models.tiny_sd15 import BUILDER_VERSION, MARKER, build_tiny_sd15, ensure_tiny_model, main

WEIGHT_FILES = {
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
}
CONFIG_FILES = {
    "model_index.json",
    MARKER,
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer_config.json",
}


def render(pipe, seed: int = 0) -> np.ndarray:
    """A 64x64, 4-step render with a seeded generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe("a photo of a cat", height=64, width=64, num_inference_steps=4, generator=generator, output_type="np")
    return out.images


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers folder, keyed by component/name."""
    return {f"{f.parent.name}/{k}": v for f in sorted(folder.glob("*/*.safetensors")) for k, v in load_file(f).items()}


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def single_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model as a civitai-style single file plus its weightless config folder."""
    out = tmp_path_factory.mktemp("single")
    ckpt = write_single_file_checkpoint(tiny_model_dir, out / "tiny-sd15.safetensors")
    return ckpt, write_config_folder(tiny_model_dir, out / "tiny-sd15-config")


def test_tokenizer_assets_are_real_clip_bpe() -> None:
    assert {p.name for p in ASSET_DIR.iterdir()} >= {
        "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"
    }
    tokenizer = CLIPTokenizer.from_pretrained(str(ASSET_DIR))
    assert len(tokenizer) == VOCAB_SIZE == 49408
    assert tokenizer(CHECK_TEXT).input_ids == CHECK_IDS == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token_id == 49407


def test_built_folder_has_exactly_the_expected_files(tiny_model_dir: Path) -> None:
    files = files_under(tiny_model_dir)
    assert {f for f in files if not f.startswith("tokenizer/")} == (WEIGHT_FILES | CONFIG_FILES) - {
        "tokenizer/tokenizer_config.json"
    }
    assert "tokenizer/tokenizer_config.json" in files
    marker = json.loads((tiny_model_dir / MARKER).read_text())
    assert marker["seed"] == 0 and marker["builder_version"] == BUILDER_VERSION


def test_pipeline_is_sd15_shaped(tiny_pipeline) -> None:
    assert tiny_pipeline.safety_checker is None
    assert tiny_pipeline.tokenizer(CHECK_TEXT).input_ids == CHECK_IDS
    assert tiny_pipeline.vae_scale_factor == 8 and tiny_pipeline.unet.config.sample_size == 8
    with torch.no_grad():
        latents = tiny_pipeline.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    scheduler = dict(tiny_pipeline.scheduler.config)
    assert {k: scheduler[k] for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")} == {
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000
    }
    assert scheduler["steps_offset"] == 1 and scheduler["prediction_type"] == "epsilon"


def test_same_seed_builds_identical_weights_and_leaves_global_rng(tiny_model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_sd15(tmp_path / "again", seed=0)
    assert torch.equal(torch.rand(3), expected_draw)
    first, again = weights(tiny_model_dir), weights(tmp_path / "again")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    other = weights(build_tiny_sd15(tmp_path / "seed1", seed=1))
    assert not torch.equal(first["unet/conv_in.weight"], other["unet/conv_in.weight"])


def test_seeded_render_is_identical_twice(tiny_pipeline) -> None:
    first, second = render(tiny_pipeline), render(tiny_pipeline)
    assert first.shape == (1, 64, 64, 3)
    assert np.array_equal(first, second)
    assert first.std() > 0.01  # not a blank image


def test_ensure_reuses_a_finished_build(tiny_model_dir: Path) -> None:
    stamp = (tiny_model_dir / MARKER).stat().st_mtime_ns
    assert ensure_tiny_model(tiny_model_dir) == tiny_model_dir
    assert (tiny_model_dir / MARKER).stat().st_mtime_ns == stamp


def test_ensure_rebuilds_an_unfinished_build_atomically(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")  # a build that died before its marker
    ensure_tiny_model(folder)
    assert json.loads((folder / MARKER).read_text())["seed"] == 0
    assert files_under(folder) >= WEIGHT_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temp siblings left behind
    ensure_tiny_model(folder, seed=1)  # an earlier build for another seed is replaced
    assert json.loads((folder / MARKER).read_text())["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_ensure_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"mine\.txt.*refusing to replace"):
        ensure_tiny_model(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_single_file_uses_original_sd_names(single_file: tuple[Path, Path]) -> None:
    ckpt, config = single_file
    with safe_open(str(ckpt), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]
    assert {
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    } <= keys
    config_files = {f for f in files_under(config) if not f.startswith("tokenizer/")}
    assert config_files == {f for f in CONFIG_FILES if not f.startswith("tokenizer/")} - {MARKER}  # no weights


def test_ldm_conversion_is_inverted_by_diffusers(tiny_model_dir: Path) -> None:
    """diffusers' own LDM -> diffusers converters must give back the exact weights."""
    for name, to_ldm, from_ldm in (
        ("unet", unet_to_ldm, convert_ldm_unet_checkpoint),
        ("vae", vae_to_ldm, convert_ldm_vae_checkpoint),
    ):
        state = load_file(tiny_model_dir / name / "diffusion_pytorch_model.safetensors")
        config = json.loads((tiny_model_dir / name / "config.json").read_text())
        back = from_ldm(to_ldm(state, config), config)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state), name
    text = load_file(tiny_model_dir / "text_encoder" / "model.safetensors")
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in text_encoder_to_ldm(text))


def test_single_file_renders_the_same_pixels(tiny_pipeline, single_file: tuple[Path, Path]) -> None:
    ckpt, config = single_file
    from_file = load_pipeline(str(ckpt), config=str(config))
    assert type(from_file.scheduler) is type(tiny_pipeline.scheduler)
    np.testing.assert_allclose(render(from_file), render(tiny_pipeline), atol=1e-5)


def test_main_prints_path_and_size(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert str(tiny_model_dir.resolve()) in out and out.strip().endswith("MB")
    assert main([]) == 2
