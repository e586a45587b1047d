"""Base-model validation (every problem has its message), offline loading, and the A1111 short hash."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from tasks.models.base_model import load_pipeline, validate_base_model
from tasks.models.single_file import write_config_folder, write_single_file_checkpoint
from tasks.sweep.hashes import model_hash


@pytest.fixture(scope="module")
def single_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    out = tmp_path_factory.mktemp("base-model")
    ckpt = write_single_file_checkpoint(tiny_model_dir, out / "tiny.safetensors")
    return str(ckpt), str(write_config_folder(tiny_model_dir, out / "tiny-config"))


def only(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    return problems[0]


def test_valid_models_have_no_problems(tiny_model_dir: Path, single_file: tuple[str, str]) -> None:
    ckpt, config = single_file
    assert validate_base_model(str(tiny_model_dir)) == []
    assert validate_base_model(ckpt, config=config) == []


def test_missing_path(tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    message = only(validate_base_model(path))
    assert path in message and "does not exist" in message and ".safetensors" in message


def test_folder_missing_index_and_components_reports_all(tmp_path: Path) -> None:
    problems = validate_base_model(str(tmp_path))
    assert len(problems) == 5
    assert all(str(tmp_path) in p for p in problems)
    for missing in ("model_index.json", "unet/", "vae/", "text_encoder/", "tokenizer/"):
        assert any(f"no {missing}" in p for p in problems), missing


def test_folder_without_safetensors_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = write_config_folder(tiny_model_dir, tmp_path / "weightless")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    problems = validate_base_model(str(folder))
    assert [p.split(": ")[1].split("/")[0] for p in problems] == ["unet", "vae", "text_encoder"]
    assert all("no .safetensors weights" in p and "safetensors only" in p for p in problems)


def test_folder_with_config_is_refused(tiny_model_dir: Path) -> None:
    message = only(validate_base_model(str(tiny_model_dir), config=str(tiny_model_dir)))
    assert "only applies to a single-file checkpoint" in message


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_single_files_are_refused(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / f"model{suffix}"
    file.write_bytes(b"not loaded")
    message = only(validate_base_model(str(file), config=str(tmp_path)))
    assert str(file) in message and "pickle" in message and "safetensors only" in message


def test_other_suffix_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "model.onnx"
    file.write_bytes(b"x")
    assert "not safetensors; safetensors only" in only(validate_base_model(str(file)))


def test_single_file_needs_config(single_file: tuple[str, str]) -> None:
    ckpt, _ = single_file
    message = only(validate_base_model(ckpt))
    assert ckpt in message and "needs config=" in message


def test_single_file_config_folder_problems(single_file: tuple[str, str], tmp_path: Path) -> None:
    ckpt, config = single_file
    assert "not a folder" in only(validate_base_model(ckpt, config=str(tmp_path / "none")))
    broken = Path(shutil.copytree(config, tmp_path / "broken"))
    (broken / "vae" / "config.json").unlink()
    shutil.rmtree(broken / "tokenizer")
    problems = validate_base_model(ckpt, config=str(broken))
    assert len(problems) == 2
    assert "no vae/config.json" in problems[0] and "no tokenizer/tokenizer.json" in problems[1]


def test_unreadable_and_incomplete_single_files(single_file: tuple[str, str], tmp_path: Path) -> None:
    _, config = single_file
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    assert "not a readable safetensors file" in only(validate_base_model(str(garbage), config=config))
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(unet_only))
    problems = validate_base_model(str(unet_only), config=config)
    assert [("(VAE)" in p, "(text encoder)" in p) for p in problems] == [(True, False), (False, True)]


def test_load_pipeline_raises_every_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as error:
        load_pipeline(str(tmp_path))
    assert str(error.value).count("\n- ") == 5


def test_load_pipeline_folder(tiny_pipeline: StableDiffusionPipeline) -> None:
    assert isinstance(tiny_pipeline, StableDiffusionPipeline)
    assert tiny_pipeline.safety_checker is None and tiny_pipeline.feature_extractor is None
    assert tiny_pipeline.unet.dtype == torch.float32 and tiny_pipeline.device.type == "cpu"


@pytest.mark.parametrize("layout", ["folder", "single file"])
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_unet_loaded_in_half_equals_fp32_cast_after(tiny_model_dir: Path, single_file: tuple[str, str],
                                                     layout: str, half: torch.dtype) -> None:
    """Training loads the UNet straight in its half dtype (never fp32 on the device): the same values as
    loading fp32 and casting, the rest of the pipeline still fp32."""
    path, config = (str(tiny_model_dir), None) if layout == "folder" else single_file
    direct = load_pipeline(path, config=config, unet_dtype=half)
    cast = load_pipeline(path, config=config).unet.to(half)
    assert direct.unet.dtype == half and direct.vae.dtype == torch.float32
    assert direct.text_encoder.dtype == torch.float32
    direct_state, cast_state = direct.unet.state_dict(), cast.state_dict()
    assert direct_state.keys() == cast_state.keys()
    for key, value in cast_state.items():
        assert torch.equal(direct_state[key], value), key


def test_model_hash(tiny_model_dir: Path, single_file: tuple[str, str], tmp_path: Path) -> None:
    ckpt, _ = single_file
    assert model_hash(ckpt) == hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()[:10]
    unet = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert model_hash(str(tiny_model_dir)) == hashlib.sha256(unet.read_bytes()).hexdigest()[:10]
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(b"one")
    first = model_hash(str(changed))
    changed.write_bytes(b"two!")  # new size: a stale cache entry would return the old hash
    assert model_hash(str(changed)) != first
    with pytest.raises(FileNotFoundError):
        model_hash(str(tmp_path / "empty-dir-missing"))
