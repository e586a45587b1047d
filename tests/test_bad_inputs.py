"""The bad-input catalogue (docs/bad-inputs.md): every case gets a clear message naming the
field or file, the bad value and what is allowed, before any model is loaded or trained."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from PIL import Image

from tasks import preflight as inputs_module
from tasks.preflight import InputError, prepare_inputs
from tasks.sweep.load import parse_spec
from tests.conftest import small_sweep_data


def make_dataset(folder: Path, count: int = 3, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (size, size), (200, 30 * i, 90)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"zqx, a picture number {i}", encoding="utf-8")
    return folder


def problems_for(tmp_path: Path, *, dataset: Path | None = None, model: dict | None = None,
                 output_dir: Path | None = None) -> str:
    data = small_sweep_data(output_dir or tmp_path / "out")
    if dataset is not None:
        data["dataset"]["path"] = str(dataset)
    if model is not None:
        data["base_models"] = [model]
    with pytest.raises(InputError) as info:
        prepare_inputs(parse_spec(data))
    return str(info.value)


def assert_mentions(message: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_dataset_folder_missing(tmp_path: Path) -> None:
    assert_mentions(problems_for(tmp_path, dataset=tmp_path / "nope"), "dataset", "nope", "is not a folder")


def test_dataset_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_mentions(problems_for(tmp_path, dataset=tmp_path / "empty"), "found 0 images", "need at least 1", "PNG")


def test_caption_missing(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds")
    (ds / "img1.txt").unlink()
    assert_mentions(problems_for(tmp_path, dataset=ds), "img1.png", "caption file img1.txt is missing")


def test_caption_not_utf8(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds")
    (ds / "img0.txt").write_bytes(b"zqx \xff\xfe caf\xe9")
    assert_mentions(problems_for(tmp_path, dataset=ds), "img0.txt", "not UTF-8")


def test_caption_empty(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds")
    (ds / "img2.txt").write_text("   \n")
    assert_mentions(problems_for(tmp_path, dataset=ds), "img2.txt", "caption is empty")


def test_corrupt_image(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds")
    (ds / "img0.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    assert_mentions(problems_for(tmp_path, dataset=ds), "img0.png", "not a readable image")


def test_image_too_small(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds")
    Image.new("RGB", (20, 300)).save(ds / "img1.png")
    assert_mentions(problems_for(tmp_path, dataset=ds), "img1.png", "20x300", "minimum side 64px")


def test_path_escaping_the_dataset_root(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds")
    outside = make_dataset(tmp_path / "elsewhere", count=1)
    (ds / "link.png").symlink_to(outside / "img0.png")
    (ds / "link.txt").write_text("zqx")
    assert_mentions(problems_for(tmp_path, dataset=ds), "link.png", "outside the dataset folder")


def test_every_dataset_problem_is_reported_at_once(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds", count=4)
    (ds / "img0.txt").unlink()
    (ds / "img1.png").write_bytes(b"garbage")
    (ds / "img2.txt").write_bytes(b"\xff")
    message = problems_for(tmp_path, dataset=ds, model={"name": "m", "path": str(tmp_path / "missing")})
    assert_mentions(message, "4 problem(s)", "img0.png", "img1.png", "img2.txt", "missing")


def test_base_model_missing(tmp_path: Path) -> None:
    message = problems_for(tmp_path, model={"name": "sd15", "path": str(tmp_path / "models/sd15")})
    assert_mentions(message, "base_models[0] (sd15)", "models/sd15", "does not exist", "diffusers folder")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoint_is_refused(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / f"model{suffix}"
    file.write_bytes(b"not loaded")
    assert_mentions(problems_for(tmp_path, model={"name": "m", "path": str(file)}), suffix, "pickle",
                    "safetensors only")


def test_single_file_without_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tasks.models.single_file import write_single_file_checkpoint

    file = write_single_file_checkpoint(tiny_model_dir, tmp_path / "model.safetensors")
    assert_mentions(problems_for(tmp_path, model={"name": "m", "path": str(file)}), "model.safetensors",
                    "needs config=")


def test_not_a_checkpoint_safetensors(tmp_path: Path) -> None:
    file = tmp_path / "random.safetensors"
    file.write_bytes(b"\x00" * 64)
    assert_mentions(problems_for(tmp_path, model={"name": "m", "path": str(file)}), "random.safetensors",
                    "not a readable safetensors file")


def test_diffusers_folder_missing_a_component(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    shutil.rmtree(folder / "unet")
    assert_mentions(problems_for(tmp_path, model={"name": "m", "path": str(folder)}), "no unet/ folder")


def test_output_dir_inside_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    assert_mentions(problems_for(tmp_path, output_dir=tmp_path / "afile" / "out"), "output_dir", "is a file")


def test_output_dir_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, which ignores permission bits: simulate the answer a normal user gets.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(inputs_module.tempfile, "TemporaryFile", refuse)
    assert_mentions(problems_for(tmp_path), "output_dir", "not writable (Permission denied)",
                    "choose a writable folder")


def test_output_dir_in_a_pseudo_filesystem_is_named_unwritable_not_full(tmp_path: Path) -> None:
    message = problems_for(tmp_path, output_dir=Path("/proc/lora-sweep-results"))
    assert_mentions(message, "output_dir '/proc/lora-sweep-results'", "is not writable", "choose a writable folder")
    assert "MiB free" not in message


def test_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(inputs_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    assert_mentions(problems_for(tmp_path), "output_dir", "only 5 MiB free", "at least 200 MiB")


def test_nothing_is_built_or_trained_when_inputs_are_bad(tmp_path: Path) -> None:
    problems_for(tmp_path, dataset=tmp_path / "nope")
    assert not (tmp_path / "out" / "small").exists()


def test_clip_model_folder_missing(tmp_path: Path) -> None:
    data = small_sweep_data(tmp_path / "out")
    data["metrics"] = {"clip_model": str(tmp_path / "clip")}
    with pytest.raises(InputError) as info:
        prepare_inputs(parse_spec(data))
    assert_mentions(str(info.value), "metrics.clip_model", "clip", "does not exist")


def test_a_refused_sweep_leaves_no_builtin_assets_or_output_folder_behind(tmp_path: Path) -> None:
    out = tmp_path / "results"
    message = problems_for(tmp_path, dataset=tmp_path / "missing", output_dir=out)
    assert "dataset" in message
    assert not out.exists()
    (out / "builtin" / "kept").mkdir(parents=True)  # made earlier by another sweep: never touched
    problems_for(tmp_path, dataset=tmp_path / "missing", output_dir=out)
    assert [p.name for p in (out / "builtin").iterdir()] == ["kept"]
