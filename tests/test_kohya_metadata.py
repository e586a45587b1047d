"""The kohya metadata of a saved LoRA, checked against independent recomputations: A1111's hashes of
the LoRA and the base model, the dataset counts kohya writes, and the runs row's training options."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from storage.layout import SweepLayout
from tasks.data.sources import load_items
from tasks.lora.kohya_metadata import bucket_info, with_hashes
from tasks.preflight import prepare_inputs
from tasks.sweep.hashes import legacy_model_hash, lora_short_hash, model_sha256
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import TrainingRunSpec, training_runs
from tasks.sweep.presets import TARGET_PRESETS
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data

# kohya repeat folders: (folder, image, caption); 3 x 2 + 1 x 1 = 7 samples per epoch.
IMAGES = (("3_zqx", "a.png", "zqx, red circle, Blue Sky"), ("3_zqx", "b.png", "zqx,  Red Circle ,"),
          ("1_street", "c.png", "a street, zqx"))


def after_header(data: bytes) -> bytes:
    """A safetensors file's tensor bytes: what A1111 hashes for a LoRA without sshs_model_hash."""
    return data[8 + int.from_bytes(data[:8], "little"):]


def legacy(data: bytes) -> str:
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def make_run(out: Path, dataset: Path, **training: object) -> TrainingRunSpec:
    data = small_sweep_data(out, ranks=[2], max_steps=3, checkpoint_steps=[1, 3], **training)
    data["dataset"] = {"path": str(dataset), "trigger_word": "zqx", "source": "kohya"}
    spec = parse_spec(data)
    inputs = prepare_inputs(spec)
    return training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]


@pytest.fixture(scope="module")
def kohya_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kohya") / "img"
    for n, (folder, name, caption) in enumerate(IMAGES):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (40 * n, 90, 200 - 40 * n)).save(root / folder / name)
        (root / folder / name).with_suffix(".txt").write_text(caption)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, kohya_dataset: Path):
    """A run on the kohya dataset, batch 2 x accumulation 2; the metadata of its two checkpoints."""
    run = make_run(tmp_path_factory.mktemp("meta"), kohya_dataset, batch_size=2, gradient_accumulation_steps=2)
    result = train_lora(run)
    files = [Path(c.lora_dir) / f"{c.checkpoint_id}.safetensors" for c in result.checkpoints]
    metas = []
    for file in files:
        with safe_open(str(file), "pt") as handle:
            metas.append(handle.metadata())
    return run, files, metas


def test_sshs_hashes_equal_a1111s_hashes_of_the_file_with_only_ss_metadata(trained, tmp_path: Path) -> None:
    _, files, metas = trained
    for file, meta in zip(files, metas):
        tensors = load_file(str(file))
        stripped = tmp_path / "stripped.safetensors"
        save_file(tensors, str(stripped), metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
        data = stripped.read_bytes()
        assert meta["sshs_model_hash"] == hashlib.sha256(after_header(data)).hexdigest()
        assert meta["sshs_legacy_hash"] == legacy(data)
        # What A1111 computes for the saved file itself, and shows in "Lora hashes": the same hash.
        assert meta["sshs_model_hash"] == hashlib.sha256(after_header(file.read_bytes())).hexdigest()
        assert lora_short_hash(file) == meta["sshs_model_hash"][:12]
    assert metas[0]["sshs_model_hash"] != metas[1]["sshs_model_hash"]  # the weights moved between checkpoints


def test_legacy_hash_reads_the_window_past_one_mib_of_the_ss_only_file() -> None:
    """The tiny LoRA is under 1 MiB (its legacy hash hashes nothing); this one reaches past 0x110000."""
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(400_000, dtype=torch.float32)}
    metadata = {"ss_network_dim": "4", "modelspec.title": "edited later"}
    hashed = with_hashes(tensors, metadata)
    only_ss = save(tensors, metadata={"ss_network_dim": "4"})
    assert hashed["sshs_legacy_hash"] == legacy(only_ss) != legacy(save(tensors, metadata=metadata))
    assert hashed["sshs_model_hash"] == hashlib.sha256(after_header(only_ss)).hexdigest()
    assert hashed["modelspec.title"] == "edited later"


def test_a_lora_without_sshs_metadata_gets_a1111s_addnet_hash(tmp_path: Path) -> None:
    file = tmp_path / "downloaded.safetensors"
    save_file({"w": torch.ones(3)}, str(file), metadata={"note": "no hashes"})
    assert lora_short_hash(file) == hashlib.sha256(after_header(file.read_bytes())).hexdigest()[:12]


def test_tag_frequency_and_dataset_dirs_count_the_kohya_folders(trained) -> None:
    _, _, metas = trained
    for meta in metas:
        assert json.loads(meta["ss_tag_frequency"]) == {
            "3_zqx": {"zqx": 2, "red circle": 2, "blue sky": 1}, "1_street": {"a street": 1, "zqx": 1}}
        assert json.loads(meta["ss_dataset_dirs"]) == {
            "3_zqx": {"n_repeats": 3, "img_count": 2}, "1_street": {"n_repeats": 1, "img_count": 1}}
        assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("7", "0")


def test_epoch_counts_samples_seen_over_samples_per_epoch(trained) -> None:
    run, _, metas = trained
    assert run.effective_batch_size == 4
    assert [m["ss_steps"] for m in metas] == ["1", "3"]
    assert [m["ss_epoch"] for m in metas] == [str(math.ceil(1 * 4 / 7)), str(math.ceil(3 * 4 / 7))] == ["1", "2"]


def test_base_model_hashes_are_a1111s_of_its_unet_weights(trained) -> None:
    run, _, metas = trained
    (unet,) = sorted((Path(run.base_model_path) / "unet").glob("*.safetensors"))
    data = unet.read_bytes()
    assert metas[0]["ss_sd_model_hash"] == legacy(data)
    assert metas[0]["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert metas[0]["ss_sd_model_name"] == run.base_model.name


def test_base_model_legacy_hash_of_a_file_and_of_sharded_unet_weights(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 5000  # 1.28 MB: the window at 1 MiB is full
    single = tmp_path / "model.safetensors"
    single.write_bytes(blob)
    assert (legacy_model_hash(str(single)), model_sha256(str(single))) == (legacy(blob),
                                                                         hashlib.sha256(blob).hexdigest())
    shards = tmp_path / "folder" / "unet"
    shards.mkdir(parents=True)
    (shards / "a.safetensors").write_bytes(blob[:0x100000 + 10])  # the window crosses into the next shard
    (shards / "b.safetensors").write_bytes(blob[0x100000 + 10:])
    assert legacy_model_hash(str(tmp_path / "folder")) == legacy(blob)
    assert model_sha256(str(tmp_path / "folder")) == hashlib.sha256(blob).hexdigest()


def test_every_value_is_a_string_and_the_run_facts_are_recorded(trained) -> None:
    run, _, metas = trained
    row = pq.read_table(SweepLayout(Path(run.sweep_root)).table_file("runs", run.run_id)).to_pylist()[0]
    for meta in metas:
        assert all(isinstance(v, str) for v in meta.values())
        assert float(meta["ss_training_started_at"]) == row["started_at"].timestamp()
        assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
        assert {k: meta[k] for k in ("ss_v2", "ss_clip_skip", "ss_max_token_length", "ss_caption_dropout_rate",
                                     "ss_shuffle_caption", "ss_keep_tokens")} == {
            "ss_v2": "False", "ss_clip_skip": "None", "ss_max_token_length": "None",
            "ss_caption_dropout_rate": "0.0", "ss_shuffle_caption": "False", "ss_keep_tokens": "0"}


def test_runs_row_records_the_training_options(tmp_path: Path, kohya_dataset: Path) -> None:
    options = dict(lora_dropout=0.1, target_preset="attention+ff", lr_scheduler="cosine", lr_warmup_steps=1,
                   gradient_accumulation_steps=2, min_snr_gamma=5.0, noise_offset=0.05, mixed_precision="bf16",
                   gradient_checkpointing=True, train_text_encoder=True, text_encoder_lr=5e-4, validation_images=1,
                   memory_preset_gib=12, batch_size=1, resolution=64)
    run = make_run(tmp_path, kohya_dataset, **options)
    train_lora(run)
    row = pq.read_table(SweepLayout(Path(run.sweep_root)).table_file("runs", run.run_id)).to_pylist()[0]
    assert row["status"] == "completed"
    expected = {k: v for k, v in options.items() if k not in ("batch_size", "resolution")}
    expected |= {"optimizer": "adamw", "lr_cycles": 1, "effective_batch_size": 2, "memory_preset_gib": 12.0,
                 "target_modules": list(TARGET_PRESETS["attention+ff"]), "num_images": 2}
    assert {k: row[k] for k in expected} == expected


def test_fields_are_written_as_sd_scripts_writes_them(trained) -> None:
    """ss_optimizer names the optimizer class by module path, ss_text_encoder_lr is "None" without a
    text-encoder LoRA, and the modelspec keys of sd-scripts' sai_model_spec.py are all there."""
    run, _, metas = trained
    meta = metas[-1]
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"
    assert meta["ss_text_encoder_lr"] == "None"
    assert {k: v for k, v in meta.items() if k.startswith("modelspec.") and k != "modelspec.date"} == {
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": run.run_id,
        "modelspec.resolution": f"{run.resolution}x{run.resolution}", "modelspec.prediction_type": "epsilon"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])


def test_bucket_counts_include_repeats_as_sd_scripts_counts_them(trained, kohya_dataset: Path) -> None:
    run, _, _ = trained
    items = load_items(run.dataset, kohya_dataset, min_size=8)  # 3_zqx: a, b; 1_street: c; all 64x64
    info = bucket_info(run.model_copy(update={"buckets": True, "bucket_step": 16}), tuple(items))
    assert [b["count"] for b in info["buckets"].values()] == [3 + 3 + 1]
