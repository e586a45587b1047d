"""CLIP metrics on a tiny random CLIP built in code, saved and loaded back like real weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from tasks.models.tiny_sd15 import TOKENIZER_DIR
from tasks.score.clip_metrics import TEXT_IMAGE_METRIC, TRAINING_METRIC, ClipScorer, TrainingClipEmbeddings

TINY = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Save a seeded tiny CLIP (32 px images, 8 px patches) with the real CLIP BPE tokenizer."""
    torch.manual_seed(seed)
    config = CLIPConfig(text_config={**TINY, "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config={**TINY, "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(folder)
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def scorer(clip_dir: Path) -> ClipScorer:
    return ClipScorer.from_pretrained(str(clip_dir), device="cpu")


def image(seed: int, size: int = 40) -> np.ndarray:
    """A random uint8 RGB image; distinct seeds give unrelated images."""
    return np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def training(scorer: ClipScorer) -> TrainingClipEmbeddings:
    return scorer.embed_training(["t0", "t1", "t2"], [image(100), image(101), image(102)])


def test_tokenizer_is_the_real_clip_bpe(scorer: ClipScorer) -> None:
    assert scorer.tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_scores_are_finite_deterministic_and_complete(scorer: ClipScorer, training: TrainingClipEmbeddings,
                                                      clip_dir: Path) -> None:
    images, prompts = [image(1), image(2), image(3)], ["a photo of a cat", "a zqx triangle", "teal"]
    first = scorer.score(images, prompts, training)
    again = ClipScorer.from_pretrained(str(clip_dir), device="cpu").score(images, prompts, training)
    assert first == again
    for row in first:
        assert [v.metric for v in row] == [TEXT_IMAGE_METRIC, TRAINING_METRIC]
        assert all(math.isfinite(v.value) for v in row)
        assert 0.0 <= row[0].value <= 100.0 and row[0].higher_is_better and row[0].reference_id is None
        assert -1.0 <= row[1].value <= 1.0 + 1e-9 and not row[1].higher_is_better
        assert row[1].reference_id in training.ids


def test_copy_of_a_training_image_has_similarity_one(scorer: ClipScorer, training: TrainingClipEmbeddings) -> None:
    rows = scorer.score([image(101), image(5)], ["anything", "anything"], training)
    copied = rows[0][1]
    assert copied.value == pytest.approx(1.0, abs=1e-5) and copied.reference_id == "t1"
    assert rows[1][1].value < 1.0 - 1e-4


def test_identical_pairs_score_identically_within_a_batch(scorer: ClipScorer) -> None:
    images = [image(7), image(8), image(7)]
    rows = scorer.score(images, ["a red cube", "a red cube", "a red cube"], None)
    assert [len(r) for r in rows] == [1, 1, 1]
    assert rows[0][0].value == pytest.approx(rows[2][0].value, abs=1e-4)  # float32 batch rows


def test_clip_score_is_100_times_clamped_cosine(scorer: ClipScorer) -> None:
    images, prompts = [image(11), image(12), image(13), image(14)], ["a", "b c", "a dog", "zqx"]
    cosines = np.sum(scorer.embed_images(images, ["i"] * 4) * scorer.embed_texts(prompts), axis=1)
    values = [row[0].value for row in scorer.score(images, prompts, None)]
    np.testing.assert_allclose(values, 100.0 * np.maximum(cosines, 0.0), atol=1e-9)


def test_float_images_equal_their_uint8_form(scorer: ClipScorer) -> None:
    as_uint8 = image(21)
    as_float = as_uint8.astype(np.float32) / 255.0
    assert scorer.score([as_float], ["x"], None) == scorer.score([as_uint8], ["x"], None)


def test_bad_score_inputs_are_all_reported(scorer: ClipScorer, training: TrainingClipEmbeddings) -> None:
    foreign = TrainingClipEmbeddings(training.ids, training.embeddings, "/elsewhere/clip")
    with pytest.raises(ValueError) as error:
        scorer.score([image(1)], ["a", "b"], foreign)
    assert "1 images but 2 prompts" in str(error.value) and "/elsewhere/clip" in str(error.value)
    with pytest.raises(ValueError, match=r"images\[0\]: expected shape HxWx3"):
        scorer.score([np.zeros((8, 8), np.uint8)], ["a"], None)


def test_bad_training_set_is_reported(scorer: ClipScorer) -> None:
    with pytest.raises(ValueError, match=r"got 2 ids but 1 images; duplicate ids \['a'\]"):
        scorer.embed_training(["a", "a"], [image(1)])


def test_missing_folder_names_path_and_expectation(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-clip"
    with pytest.raises(ValueError) as error:
        ClipScorer.from_pretrained(str(missing))
    message = str(error.value)
    assert str(missing) in message and "does not exist" in message
    assert "model.safetensors" in message and "openai/clip-vit-large-patch14" in message


def test_incomplete_folder_lists_every_missing_file(tmp_path: Path, clip_dir: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((clip_dir / "config.json").read_text())
    (partial / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError) as error:
        ClipScorer.from_pretrained(str(partial))
    message = str(error.value)
    for missing in ("no model.safetensors", "no preprocessor_config.json", "no tokenizer.json"):
        assert missing in message
    assert "config.json" not in message.split("expected")[0].replace("preprocessor_config.json", "")


def test_non_clip_config_is_refused(tmp_path: Path, clip_dir: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type is 'bert', expected 'clip'"):
        ClipScorer.from_pretrained(str(other))


def test_score_task_adds_clip_rows_for_every_image(clip_dir: Path, tmp_path: Path) -> None:
    """With metrics.clip_model set, every rendered image gets both CLIP metrics."""
    from PIL import Image as PILImage

    from storage.layout import SweepLayout
    from storage.parquet_io import write_rows
    from tasks.data.demo_world import write_demo_dataset
    from tasks.score import job as score
    from tasks.sweep.plan import RenderJobSpec

    dataset = write_demo_dataset(tmp_path / "ds", count=3)
    layout = SweepLayout(tmp_path / "sweep")
    job = RenderJobSpec(
        render_id="r1", sweep_id="s", sweep_root=str(layout.root),
        base_model={"name": "m", "path": "builtin:tiny-sd15"}, base_model_path="x", checkpoint=None,
        prompts=("a photo of zqx",), negative_prompt="", seeds=(1, 2), samplers=("Euler",), steps=(2,),
        lora_weights=(0.0,), cfg_scales=(7.0,), width=64, height=64, trigger_word="zqx", baseline_render_id=None,
        dataset_path=str(dataset), dataset={"path": str(dataset), "trigger_word": "zqx"}, concept_trigger=None, clip_model_path=str(clip_dir))
    rows = []
    for seed in (1, 2):
        path = layout.render_dir("r1") / f"img{seed}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        PILImage.fromarray(image(seed, 64)).save(path)
        rows.append({"sweep_id": "s", "image_id": f"img{seed}", "render_id": "r1", "base_model": "m", "run_id": None,
                     "checkpoint_id": None, "rank": None, "checkpoint_step": None, "sampler": "Euler", "steps": 2,
                     "lora_weight": 0.0, "cfg_scale": 7.0, "prompt_index": 0, "prompt": "a photo of zqx",
                     "negative_prompt": "", "seed": seed, "width": 64, "height": 64, "path": str(path),
                     "render_s": 0.1, "extra_loras": None, "precision": "fp32",
                     "prompt_syntax": "a1111", "prompt_tokens": 4, "clip_skip": 1, "prompt_source": "spec",
                     "source_image": None, "held_out": None})
    write_rows("images", rows, layout.table_file("images", "r1"))
    import pyarrow.parquet as pq

    metrics = pq.read_table(score.score_job(job)).to_pylist()
    clip = [(m["image_id"], m["metric"]) for m in metrics if m["metric"].startswith("clip_")]
    assert sorted(clip) == sorted((f"img{s}", name) for s in (1, 2)
                                  for name in ("clip_text_image_score", "clip_similarity_to_training"))
