"""The encoding cache (disk, memory, off) and aspect-ratio buckets, on the tiny model (CPU, few steps)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft.utils import get_peft_model_state_dict
from PIL import Image

from tasks.data.dataset import DatasetItem, crop_sizes, item_size, scan_dataset
from tasks.models.base_model import load_pipeline
from tasks.models.text_conditioning import size_ids, text_encoders
from tasks.preflight import InputError, prepare_inputs
from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.plan import TrainingRunSpec, training_runs
from tasks.train.encodings import encode_training_set, weights_fingerprint
from tasks.train.loop import draw_examples, fit_lora
from tests.conftest import small_sweep_data


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("encodings")
    inputs = prepare_inputs(parse_spec(small_sweep_data(out)))
    return out, inputs, scan_dataset(Path(inputs.dataset_path))


def make_run(world, dataset: dict | None = None, **training: object) -> TrainingRunSpec:
    out, inputs, _ = world
    data = small_sweep_data(out, **{"ranks": [2], "max_steps": 3, "checkpoint_steps": [3], **training})
    if dataset:
        data["dataset"] = dataset
        inputs = prepare_inputs(parse_spec(data))
    return training_runs(parse_spec(data), inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]


def fit(world, run: TrainingRunSpec, items: list[DatasetItem] | None = None):
    """Train in memory; returns the LoRA weights, the losses and how often the VAE and text encoder ran."""
    _, inputs, world_items = world
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    calls = {"vae": 0, "text": 0}
    pipe.vae.encoder.register_forward_hook(lambda *_: calls.__setitem__("vae", calls["vae"] + 1))
    pipe.text_encoder.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    losses = fit_lora(pipe, run, items or world_items, device="cpu").losses
    return get_peft_model_state_dict(pipe.unet, adapter_name="default"), losses, calls


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_disk_cache_trains_bit_for_bit_like_memory_and_a_warm_cache_skips_the_encoders(world, tmp_path, caplog):
    _, _, items = world
    cache = tmp_path / "cache"
    memory, memory_losses, memory_calls = fit(world, make_run(world, cache="memory"))
    cold, cold_losses, cold_calls = fit(world, make_run(world, cache_dir=str(cache)))
    with caplog.at_level(logging.INFO, logger="tasks.train.encodings"):
        warm, warm_losses, warm_calls = fit(world, make_run(world, cache_dir=str(cache)))
    assert_same(memory, cold)
    assert_same(memory, warm)
    assert memory_losses == cold_losses == warm_losses
    assert memory_calls == {"vae": len(items), "text": len(items)}  # each image and caption once
    assert cold_calls == {"vae": len(items), "text": len({item.caption for item in items})}  # a repeat is a hit
    assert warm_calls == {"vae": 0, "text": 0}
    assert f"{2 * len(items)} hits, 0 encoded" in caplog.text
    assert len(list((cache / "vae").rglob("*.safetensors"))) == len(items)
    assert len(list((cache / "text").rglob("*.safetensors"))) == len({item.caption for item in items})


def test_cache_keys_follow_content_and_weights_and_a_damaged_entry_is_encoded_again(world, tmp_path):
    _, inputs, items = world
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    encoders, tokenizers = text_encoders(pipe)
    sizes = crop_sizes(items, 64)

    def encode(these: list[DatasetItem]):
        generator = torch.Generator().manual_seed(0)
        return encode_training_set(these, sizes, pipe.vae, encoders, tokenizers, generator, "cpu", mode="disk",
                                   cache_dir=str(tmp_path))

    n, captions = len(items), len({item.caption for item in items})
    first = encode(items)
    assert (first.cache_stats.hits, first.cache_stats.misses) == (n - captions, n + captions)
    entries = sorted((tmp_path / "vae").rglob("*.safetensors"))
    # One image's bytes change: only its latent is encoded again.
    changed = tmp_path / "changed.png"
    Image.open(items[0].path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed)
    edited = encode([DatasetItem(f"{items[0].path.stem}-edited", changed, items[0].caption), *items[1:]])
    assert (edited.cache_stats.hits, edited.cache_stats.misses) == (2 * n - 1, 1)
    # A damaged file is not trusted: it is encoded again, rewritten, and the latents are unchanged.
    victim = entries[0]
    victim.write_bytes(b"not a safetensors file")
    repaired = encode(items)
    assert repaired.cache_stats.misses == 1
    for a, b in zip(first.latents, repaired.latents, strict=True):
        assert torch.equal(a, b)
    assert victim.stat().st_size > 100
    # Other VAE weights are another key: nothing is reused.
    with torch.no_grad():
        next(pipe.vae.encoder.parameters()).add_(0.01)
    assert weights_fingerprint(pipe.vae) != weights_fingerprint(load_pipeline(inputs.model_paths["tiny-sd15"]).vae)
    assert encode(items).cache_stats.hits == len(items)  # the captions only


def test_cache_off_encodes_every_step_from_the_same_posterior(world):
    _, inputs, items = world
    run = make_run(world, cache="off", batch_size=2)
    _, losses, calls = fit(world, run)
    assert all(np.isfinite(losses))
    assert calls == {"vae": run.max_steps, "text": run.max_steps}  # one batch each per step
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    encoders, tokenizers = text_encoders(pipe)
    sizes = crop_sizes(items, 64)
    off = encode_training_set(items, sizes, pipe.vae, encoders, tokenizers, torch.Generator(), "cpu", mode="off")
    cached = encode_training_set(items, sizes, pipe.vae, encoders, tokenizers, torch.Generator(), "cpu",
                                 mode="memory")
    assert off.latents is None and off.text_every_step and not cached.text_every_step
    fresh = off.latents_for([3], pipe.vae, torch.Generator().manual_seed(7), "cpu")
    with torch.no_grad():
        params = pipe.vae.encode(off.pixels[3][None]).latent_dist.parameters
    expected = DiagonalGaussianDistribution(params).sample(torch.Generator().manual_seed(7))
    assert torch.allclose(fresh, expected * pipe.vae.config.scaling_factor, atol=1e-6)


def test_run_ids_ignore_where_encodings_are_cached_but_not_cache_off_or_buckets(world, tmp_path):
    ids = {name: make_run(world, **options).run_id for name, options in {
        "disk": {}, "elsewhere": {"cache_dir": str(tmp_path)}, "memory": {"cache": "memory"}, "off": {"cache": "off"},
        "buckets": {"buckets": True, "bucket_step": 16}, "buckets32": {"buckets": True, "bucket_step": 32}}.items()}
    assert ids["disk"] == ids["elsewhere"] == ids["memory"]
    assert len({ids["disk"], ids["off"], ids["buckets"], ids["buckets32"]}) == 4
    out, _, _ = world
    assert make_run(world).cache_dir == str(out / "cache")
    assert make_run(world, cache="memory").cache_dir is None


def test_bad_cache_and_bucket_settings_are_refused_before_work(world, tmp_path):
    out, _, _ = world
    cases = [({"cache": "gpu"}, "'disk', 'memory' or 'off'"),
             ({"cache": "memory", "cache_dir": str(tmp_path)}, "cache_dir"),
             ({"buckets": True, "bucket_step": 12}, "bucket_step"),
             ({"buckets": True, "bucket_step": 128}, "bucket_step 128 exceeds resolution 64")]
    for training, expected in cases:
        with pytest.raises(SpecError, match="training") as err:
            parse_spec(small_sweep_data(out, **training))
        assert expected in str(err.value)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match="training.cache_dir .* is a file, not a folder"):
        prepare_inputs(parse_spec(small_sweep_data(out, cache_dir=str(blocker / "cache"))))


# ---- aspect-ratio buckets ----------------------------------------------------------------------

SHAPES = [(128, 64), (128, 64), (64, 128), (64, 128), (64, 64), (96, 96)]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six captioned images: two wide, two tall, two square."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SHAPES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"zqx, picture {i}")
    return folder


def test_buckets_keep_each_images_shape(mixed_folder):
    items = scan_dataset(mixed_folder)
    assert crop_sizes(items, 64) == [(64, 64)] * 6
    buckets = crop_sizes(items, 64, bucket_step=16)
    assert buckets[0] == buckets[1] and buckets[0][0] > buckets[0][1]  # wide
    assert buckets[2] == buckets[3] == buckets[0][::-1]  # tall
    assert buckets[4] == buckets[5] == (64, 64)
    assert all(w * h <= 64 * 64 and w % 16 == 0 and h % 16 == 0 for w, h in buckets)


def test_a_batch_comes_from_one_bucket_and_repeats_still_weight_the_draw():
    sizes = [(80, 48)] * 3 + [(64, 64)] * 2
    repeats = torch.tensor([1.0, 1.0, 4.0, 1.0, 1.0])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(3000):
        index = draw_examples(repeats, sizes, 3, generator)
        assert len({sizes[i] for i in index.tolist()}) == 1
        counts += torch.bincount(index, minlength=5)
    share = counts / counts.sum()
    expected = repeats / repeats.sum()
    assert torch.allclose(share, expected, atol=0.03), (share, expected)


def test_bucketed_training_feeds_the_unet_each_buckets_shape(world, mixed_folder):
    dataset = {"path": str(mixed_folder), "trigger_word": "zqx"}
    run = make_run(world, dataset, buckets=True, bucket_step=16, batch_size=2, max_steps=12, checkpoint_steps=[12])
    items = scan_dataset(mixed_folder)
    _, inputs, _ = world
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    shapes: list[tuple[int, ...]] = []
    pipe.unet.register_forward_pre_hook(lambda _module, args: shapes.append(tuple(args[0].shape)))
    losses = fit_lora(pipe, run, items, device="cpu").losses
    assert all(np.isfinite(losses))
    latent_shapes = {(2, 4, h // 8, w // 8) for w, h in crop_sizes(items, 64, bucket_step=16)}
    assert set(shapes) <= latent_shapes and len(set(shapes)) >= 2


def test_sdxl_size_ids_describe_the_bucket_crop(mixed_folder, tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (160, 80)).save(wide)
    # Covered at scale max(80/160, 48/80) = 0.6: 96 x 48, cropped 8 px from the left.
    item = DatasetItem("wide", wide, "zqx")  # no size recorded: read from the file
    assert size_ids(item_size(item), 64, (80, 48)) == [80.0, 160.0, 0.0, 8.0, 48.0, 80.0]
    assert size_ids(item_size(item), 64) == [80.0, 160.0, 0.0, 32.0, 64.0, 64.0]  # the square crop, as before


def test_a_bucketed_run_records_its_buckets_in_kohya_metadata_and_the_runs_table(world, mixed_folder):
    import json

    import pyarrow.parquet as pq
    from safetensors import safe_open

    from storage.layout import SweepLayout
    from tasks.train.run import train_lora

    dataset = {"path": str(mixed_folder), "trigger_word": "zqx"}
    run = make_run(world, dataset, buckets=True, bucket_step=16, max_steps=2, checkpoint_steps=[2])
    ckpt = train_lora(run).checkpoints[-1]
    with safe_open(str(Path(ckpt.lora_dir) / f"{ckpt.checkpoint_id}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_enable_bucket"] == "True" and meta["ss_cache_latents"] == "True"
    info = json.loads(meta["ss_bucket_info"])
    counts = {tuple(b["resolution"]): b["count"] for b in info["buckets"].values()}
    assert counts == {(80, 48): 2, (48, 80): 2, (64, 64): 2}
    assert info["mean_img_ar_error"] == pytest.approx((2 * (2 - 80 / 48) + 2 * (0.5 - 48 / 80) * -1) / 6)
    row = pq.read_table(SweepLayout(Path(run.sweep_root)).table_file("runs", run.run_id)).to_pylist()[0]
    assert (row["buckets"], row["bucket_step"], row["encoding_cache"]) == (True, 16, "disk")
