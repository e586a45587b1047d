"""Datasets as users bring them: images found by content, byte-order marks, kohya folders found by
themselves, bad files skipped on request, ranks wider than the model's layers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors import safe_open

from storage.layout import SweepLayout
from tasks.data.dataset import DatasetError, dataset_summary
from tasks.data.sources import load_dataset, load_items
from tasks.models.base_model import load_pipeline
from tasks.models.memory import component_params, render_weight_bytes, training_weight_bytes
from tasks.preflight import InputError, prepare_inputs
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import training_runs
from tasks.sweep.spec import DatasetSpec
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data


def picture(path: Path, fmt: str | None = None, caption: str | None = "zqx, a shape", size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(path.name)).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def spec(path: Path, **fields: object) -> DatasetSpec:
    return DatasetSpec(path=str(path), trigger_word="zqx", **fields)


def test_every_format_pillow_reads_is_an_image_by_content_and_other_files_are_listed(tmp_path: Path) -> None:
    picture(tmp_path / "a.png")
    picture(tmp_path / "b.tif", "TIFF")
    picture(tmp_path / "c.gif", "GIF")
    picture(tmp_path / "d.data", "PNG")  # a PNG under an unusual suffix: read by its content
    (tmp_path / "notes.md").write_text("shot list")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    loaded = load_dataset(spec(tmp_path), tmp_path, min_size=64)
    assert sorted(i.path.name for i in loaded.items) == ["a.png", "b.tif", "c.gif", "d.data"]
    assert loaded.not_images == ("notes.md: not an image (no format Pillow reads)",)
    summary = dataset_summary(loaded.items, not_images=loaded.not_images).format()
    assert re.search(r"not images, ignored\s+1\n", summary) and "notes.md: not an image" in summary


def test_a_damaged_file_with_an_image_suffix_is_a_bad_file_not_ignored(tmp_path: Path) -> None:
    picture(tmp_path / "a.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "broken.txt").write_text("zqx")
    with pytest.raises(DatasetError, match=r"broken.jpg: not a readable image"):
        load_items(spec(tmp_path), tmp_path, min_size=8)


def test_a_caption_with_a_byte_order_mark_loses_it(tmp_path: Path) -> None:
    picture(tmp_path / "a.png", caption=None)
    (tmp_path / "a.txt").write_bytes("\ufeffzqx, a shape".encode())
    assert [i.caption for i in load_items(spec(tmp_path), tmp_path, min_size=8)] == ["zqx, a shape"]


def test_kohya_repeat_folders_are_found_with_the_default_source(tmp_path: Path) -> None:
    picture(tmp_path / "img" / "20_zqx" / "a.png")
    picture(tmp_path / "img" / "20_zqx" / "b.png")
    picture(tmp_path / "img" / "3_style" / "c.png")
    loaded = load_dataset(spec(tmp_path / "img"), tmp_path / "img", min_size=8)
    assert loaded.source == "kohya"
    assert sorted((i.path.name, i.repeats) for i in loaded.items) == [("a.png", 20), ("b.png", 20), ("c.png", 3)]
    # Said explicitly, sidecar is obeyed: every image at repeats 1.
    plain = load_items(spec(tmp_path / "img", source="sidecar"), tmp_path / "img", min_size=8)
    assert {i.repeats for i in plain} == {1}


def test_pointing_at_a_repeat_folder_names_its_parent_once(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        picture(tmp_path / "img" / "20_zqx" / f"{name}.png")
    with pytest.raises(DatasetError) as info:
        load_items(spec(tmp_path / "img" / "20_zqx", source="kohya"), tmp_path / "img" / "20_zqx", min_size=8)
    assert len(info.value.problems) == 1
    assert "is itself a kohya repeat folder (20_zqx)" in info.value.problems[0]
    assert repr(str(tmp_path / "img")) in info.value.problems[0]


def test_skip_trains_on_the_good_files_and_says_which_were_left_out(tmp_path: Path) -> None:
    for name in ("a", "b"):
        picture(tmp_path / f"{name}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "broken.txt").write_text("zqx")
    picture(tmp_path / "tiny.png", size=(16, 16))
    picture(tmp_path / "nocaption.png", caption=None)
    with pytest.raises(DatasetError):
        load_items(spec(tmp_path), tmp_path, min_size=32)
    loaded = load_dataset(spec(tmp_path, on_bad_file="skip"), tmp_path, min_size=32)
    assert sorted(i.path.name for i in loaded.items) == ["a.png", "b.png"]
    assert [s.split(":")[0] for s in loaded.skipped] == ["broken.png", "nocaption.png", "tiny.png"]
    assert re.search(r"bad files skipped\s+3\n", dataset_summary(loaded.items, skipped=loaded.skipped).format())


def test_skip_still_refuses_a_dataset_left_below_min_images(tmp_path: Path) -> None:
    picture(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"nope")
    (tmp_path / "broken.txt").write_text("zqx")
    with pytest.raises(DatasetError, match=r"found 1 images \(1 bad file\(s\) skipped: broken.png: .*need at least 2"):
        load_items(spec(tmp_path, on_bad_file="skip", min_images=2), tmp_path, min_size=8)


def test_skipped_files_reach_the_runs_row_and_the_kohya_metadata(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    for name in ("a", "b", "c"):
        picture(data_dir / f"{name}.png")
    (data_dir / "broken.png").write_bytes(b"nope")
    (data_dir / "broken.txt").write_text("zqx")
    data = small_sweep_data(tmp_path / "out", ranks=[2], max_steps=2, checkpoint_steps=[2])
    data["dataset"] = {"path": str(data_dir), "trigger_word": "zqx", "on_bad_file": "skip"}
    sweep = parse_spec(data)
    inputs = prepare_inputs(sweep)
    run = training_runs(sweep, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    result = train_lora(run)
    row = pq.read_table(SweepLayout(Path(run.sweep_root)).table_file("runs", run.run_id)).to_pylist()[0]
    assert row["num_images"] == 3 and [s.split(":")[0] for s in row["skipped_files"]] == ["broken.png"]
    ckpt = result.checkpoints[-1]
    with safe_open(str(Path(ckpt.lora_dir) / f"{ckpt.checkpoint_id}.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert [s.split(":")[0] for s in json.loads(meta["lora_sweep.skipped_files"])] == ["broken.png"]
    assert meta["ss_num_train_images"] == "3"


def test_a_rank_wider_than_every_layer_is_refused_and_a_wide_one_warned(tmp_path: Path, capsys) -> None:
    data = small_sweep_data(tmp_path / "out", ranks=[4096])
    with pytest.raises(InputError, match=r"training.ranks: rank 4096 is wider than every layer it adapts .*"
                                         r"allowed: up to 64"):
        prepare_inputs(parse_spec(data))
    prepare_inputs(parse_spec(small_sweep_data(tmp_path / "out", ranks=[48])))
    assert "warning: training.ranks: rank 48 is wider than the UNet's 32-wide layers" in capsys.readouterr().out


@pytest.mark.parametrize("builtin", ["tiny-sd15", "tiny-sdxl"])
def test_weight_bytes_counted_from_configs_equal_the_loaded_models(tmp_path: Path, builtin: str) -> None:
    data = small_sweep_data(tmp_path / "out")
    data["base_models"] = [{"name": builtin, "path": f"builtin:{builtin}"}]
    folder = Path(prepare_inputs(parse_spec(data)).model_paths[builtin])
    pipe = load_pipeline(str(folder))
    loaded = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}
    assert component_params(folder) == loaded
    assert render_weight_bytes(folder, "fp32") == 4 * sum(loaded.values())
    assert training_weight_bytes(folder, "bf16") == 2 * (sum(loaded.values()) - loaded["vae"]) + 4 * loaded["vae"]


def test_a_model_whose_weights_alone_exceed_the_memory_is_refused(tmp_path: Path, monkeypatch) -> None:
    from tasks import preflight

    monkeypatch.setattr(preflight, "device_memory_bytes", lambda device: 2**20)  # a 1 MiB machine
    with pytest.raises(InputError) as info:
        prepare_inputs(parse_spec(small_sweep_data(tmp_path / "out")))
    message = str(info.value)
    assert re.search(r"training.mixed_precision = 'no': the frozen weights alone take \d+\.\d MiB, more than "
                     r"the 1\.0 MiB of memory training gets here \(cpu\); allowed: 'fp16' or 'bf16'", message)
    assert "render.precision = 'auto' (fp32): the weights alone take" in message
