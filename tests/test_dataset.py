"""Dataset sources, caption functions, image preprocessing, buckets, the summary and the captioner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data.captions import BlipCaptioner, CaptionerError, drop_caption, prefix_trigger, shuffle_tags
from tasks.data.dataset import (
    DatasetError,
    DatasetItem,
    assign_buckets,
    bucket_resolutions,
    dataset_fingerprint,
    dataset_summary,
    inspect_image,
    load_clip_tokenizer,
    load_training_image,
    to_rgb,
)
from tasks.data.sources import load_items
from tasks.preflight import InputError, prepare_inputs
from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.spec import DatasetSpec
from tests.conftest import small_sweep_data


def image(path: Path, size: tuple[int, int] = (64, 64), caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (len(path.stem) * 20 % 255, 90, 40)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def spec(path: Path, **fields: object) -> DatasetSpec:
    return DatasetSpec(path=str(path), trigger_word="KMPLZ", **fields)


def test_sidecar_source_is_the_default(tmp_path: Path) -> None:
    image(tmp_path / "a.png", (80, 64), "KMPLZ, a fox")
    image(tmp_path / "b.jpg", caption="a fox")
    items = load_items(spec(tmp_path), tmp_path, min_size=64)
    assert [(i.path.name, i.caption, i.repeats, i.size) for i in items] == [
        ("a.png", "KMPLZ, a fox", 1, (80, 64)), ("b.jpg", "a fox", 1, (64, 64))]


def test_kohya_repeat_folders(tmp_path: Path) -> None:
    for n in range(2):
        image(tmp_path / "img/100_VadymPanchenko" / f"p{n}.png", caption=f"VadymPanchenko photo {n}")
    image(tmp_path / "img/3_street" / "s.png", caption="a street")
    items = load_items(spec(tmp_path / "img", source="kohya"), tmp_path / "img", min_size=64)
    assert sorted((i.path.name, i.repeats) for i in items) == [("p0.png", 100), ("p1.png", 100), ("s.png", 3)]
    assert dataset_summary(items).samples_per_epoch == 203
    plain = [DatasetItem(i.image_id, i.path, i.caption) for i in items]
    assert dataset_fingerprint(plain) != dataset_fingerprint(items)


def test_kohya_folder_without_repeat_count(tmp_path: Path) -> None:
    image(tmp_path / "VadymPanchenko" / "p.png", caption="x")
    with pytest.raises(DatasetError, match="VadymPanchenko/: not a kohya repeat folder.*100_VadymPanchenko"):
        load_items(spec(tmp_path, source="kohya"), tmp_path, min_size=8)


def test_metadata_jsonl(tmp_path: Path) -> None:
    image(tmp_path / "train/a.png")
    image(tmp_path / "train/b.png")
    rows = [{"file_name": "train/a.png", "text": "KMPLZ, red"}, {"file_name": "train/b.png", "text": "blue"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_items(spec(tmp_path, source="metadata_jsonl"), tmp_path, min_size=64)
    assert [(i.path.name, i.caption) for i in items] == [("a.png", "KMPLZ, red"), ("b.png", "blue")]


def write_museum(folder: Path) -> None:
    rows = [("Rembrandt", "The Night Watch", "a.png"), ("Vermeer", "The Milkmaid", "b.png"),
            ("Monet", "Water Lilies", "c.png")]
    for _, _, file in rows:
        image(folder / "images" / file)
    lines = ["artist,title,image_path"] + [f"{a},{t},images/{f}" for a, t, f in rows]
    (folder / "objects.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_csv_with_filter_and_template(tmp_path: Path) -> None:
    write_museum(tmp_path)
    ds = spec(tmp_path, source="csv", csv_file="objects.csv", csv_image_column="image_path",
              caption_template="a painting by {artist}, {title}", csv_filter={"artist": ["Rembrandt", "Vermeer"]})
    items = load_items(ds, tmp_path, min_size=64)
    assert [i.caption for i in items] == ["a painting by Rembrandt, The Night Watch",
                                          "a painting by Vermeer, The Milkmaid"]


def test_prefix_trigger_is_explicit(tmp_path: Path) -> None:
    image(tmp_path / "a.png", caption="an illustration, flat colours")
    image(tmp_path / "b.png", caption="KMPLZ, poster")
    assert [i.caption for i in load_items(spec(tmp_path), tmp_path, min_size=8)][0] == "an illustration, flat colours"
    items = load_items(spec(tmp_path, prefix_trigger=True), tmp_path, min_size=8)
    assert [i.caption for i in items] == ["KMPLZ, an illustration, flat colours", "KMPLZ, poster"]
    assert prefix_trigger("xKMPLZ art", "KMPLZ") == "KMPLZ, xKMPLZ art"


def test_caption_dropout_is_seeded() -> None:
    def run(seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        return [drop_caption("KMPLZ, fox", 0.3, rng) for _ in range(400)]

    assert run(1) == run(1) and run(1) != run(2)
    assert 0.2 < run(1).count("") / 400 < 0.4
    rng = np.random.default_rng(0)
    assert drop_caption("a", 0.0, rng) == "a" and drop_caption("a", 1.0, rng) == ""


def test_shuffle_keeps_the_first_n_tags() -> None:
    caption = "KMPLZ, poster, red, blue, green, tree, sky"
    shuffled = {shuffle_tags(caption, 2, np.random.default_rng(seed)) for seed in range(20)}
    assert len(shuffled) > 1
    for text in shuffled:
        tags = text.split(", ")
        assert tags[:2] == ["KMPLZ", "poster"] and sorted(tags) == sorted(caption.split(", "))
    assert shuffle_tags(caption, 2, np.random.default_rng(5)) == shuffle_tags(caption, 2, np.random.default_rng(5))


def _sixteen_bit(value: int) -> Image.Image:
    return Image.frombytes("I;16", (4, 4), np.full((4, 4), value, dtype="<u2").tobytes())


@pytest.mark.parametrize(("make", "rgb"), [
    (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),
    (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 255)), (255, 0, 0)),
    (lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
    (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
    (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    (lambda: _sixteen_bit(65535), (255, 255, 255)),
    (lambda: _sixteen_bit(257 * 128), (128, 128, 128)),
    (lambda: _sixteen_bit(1000), (4, 4, 4)),
    (lambda: Image.fromarray(np.full((4, 4), 65535, dtype=np.int32)), (255, 255, 255)),
])
def test_image_modes_become_rgb(make, rgb: tuple[int, int, int]) -> None:
    out = to_rgb(make())
    assert out.mode == "RGB" and out.getpixel((1, 1)) == rgb


def test_sixteen_bit_png_file_is_scaled_not_clipped(tmp_path: Path) -> None:
    _sixteen_bit(257 * 200).save(tmp_path / "g16.png")
    expected = 200 / 127.5 - 1.0
    assert np.allclose(load_training_image(tmp_path / "g16.png", 4), expected, atol=1e-5)


def test_palette_transparency_is_white(tmp_path: Path) -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0] * 256)
    img.save(tmp_path / "p.png", transparency=0)
    assert np.allclose(load_training_image(tmp_path / "p.png", 8), 1.0)


def test_exif_rotation(tmp_path: Path) -> None:
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left half red; orientation 6 shows it rotated 90 degrees clockwise
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    item, problem = inspect_image(tmp_path / "r.jpg", tmp_path, "", min_size=8)
    assert problem is None and item is not None and item.size == (32, 64)
    out = load_training_image(tmp_path / "r.jpg", 32, size=(32, 64))
    assert out.shape == (64, 32, 3)
    assert out[2, 16, 0] > 0.9 and out[2, 16, 2] < -0.9 and out[60, 16, 0] < -0.9


def test_buckets() -> None:
    buckets = bucket_resolutions(512)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 0.5 <= w / h <= 2 for w, h in buckets)
    sizes = [(512, 512), (1024, 512), (600, 900), (3000, 1000), (100, 100)]
    assert assign_buckets(sizes, 512) == [(512, 512), (640, 384), (384, 640), (640, 384), (512, 512)]
    assert assign_buckets([(2048, 1024)], 1024) == [(1408, 704)]


def test_summary_counts_and_long_captions() -> None:
    long = "KMPLZ, " + ", ".join(f"tag{i}" for i in range(60))
    items = [DatasetItem("a", Path("a.png"), "KMPLZ, short", 2, (512, 512)),
             DatasetItem("b", Path("b.png"), long, 1, (1024, 512)),
             DatasetItem("c", Path("c.png"), "no trigger", 1, (600, 900))]
    summary = dataset_summary(items, load_clip_tokenizer(), resolution=512, trigger_word="KMPLZ")
    assert (summary.num_items, summary.samples_per_epoch, summary.repeats) == (3, 4, {2: 1, 1: 2})
    assert summary.widths == (512, 600, 1024) and summary.heights == (512, 512, 900)
    assert summary.buckets == {(512, 512): 1, (640, 384): 1, (384, 640): 1}
    assert (summary.long_captions, summary.without_trigger, summary.max_tokens) == (1, 1, 77)
    text = summary.format()
    assert re.search(r"samples per epoch +4\n", text) and re.search(r"captions > 77 tokens +1\n", text)
    assert "234 tokens: KMPLZ, tag0" in text


def tiny_blip(folder: Path) -> Path:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "cat", "dog", "photo", "of", "red"]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(vision_config=dict(small, image_size=32, patch_size=16), projection_dim=16,
                        text_config=dict(small, vocab_size=len(words), max_position_embeddings=32, bos_token_id=5,
                                         pad_token_id=0, sep_token_id=3, eos_token_id=3))
    BlipForConditionalGeneration(config).save_pretrained(folder)
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
                  ).save_pretrained(folder)
    return folder


def test_blip_captioner_on_a_tiny_model(tmp_path: Path) -> None:
    captioner = BlipCaptioner(tiny_blip(tmp_path / "blip"), max_new_tokens=4)
    captions = captioner.caption([Image.new("RGB", (40, 50), (255, 0, 0)), Image.new("L", (64, 64))])
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    with pytest.raises(CaptionerError, match="is not a local BLIP model folder.*nothing is downloaded"):
        BlipCaptioner(tmp_path / "nope")


class FakeCaptioner:
    def caption(self, images: list[Image.Image]) -> list[str]:
        return [f"a portrait {img.size[0]}px" for img in images]


def test_uncaptioned_portraits_need_a_captioner(tmp_path: Path) -> None:
    image(tmp_path / "p0.png", (70, 64))
    image(tmp_path / "p1.png", caption="KMPLZ, smiling")
    with pytest.raises(DatasetError, match="p0.png: caption file p0.txt is missing"):
        load_items(spec(tmp_path), tmp_path, min_size=8)
    ds = spec(tmp_path, captioner="blip:/models/blip", prefix_trigger=True)
    items = load_items(ds, tmp_path, min_size=8, captioner=FakeCaptioner())
    assert [i.caption for i in items] == ["KMPLZ, a portrait 70px", "KMPLZ, smiling"]


def input_problems(tmp_path: Path, model_dir: Path, **dataset: object) -> str:
    data = small_sweep_data(tmp_path / "out")
    data["dataset"] = {"path": str(tmp_path / "ds"), "trigger_word": "zqx", **dataset}
    data["base_models"] = [{"name": "tiny", "path": str(model_dir)}]
    with pytest.raises(InputError) as info:
        prepare_inputs(parse_spec(data))
    return str(info.value)


def test_bad_csv_inputs(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_museum(tmp_path / "ds")
    base = {"source": "csv", "csv_file": "objects.csv", "csv_image_column": "image_path"}
    message = input_problems(tmp_path, tiny_model_dir, **base, caption_template="by {painter}")
    assert "dataset.caption_template: column 'painter' not found in objects.csv; columns are: artist, title" in message
    message = input_problems(tmp_path, tiny_model_dir, **base, csv_caption_column="title",
                             csv_filter={"artist": ["Rembrant"]})
    assert "csv_filter {'artist': ('Rembrant',)} matches none of the 3 rows of objects.csv" in message


def test_jsonl_path_escaping_the_root(tmp_path: Path, tiny_model_dir: Path) -> None:
    image(tmp_path / "outside.png")
    image(tmp_path / "ds/in.png")
    rows = [{"file_name": "in.png", "text": "zqx"}, {"file_name": "../outside.png", "text": "zqx"}]
    (tmp_path / "ds/metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    message = input_problems(tmp_path, tiny_model_dir, source="metadata_jsonl")
    assert "metadata.jsonl line 2: image path '../outside.png' escapes the dataset folder" in message


def test_bad_dataset_spec_values() -> None:
    data = small_sweep_data(Path("out"))
    data["dataset"].update(source="zip", caption_dropout=1.5, captioner="clip:/x")
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    message = str(info.value)
    assert "dataset.source: got 'zip'; Input should be 'auto', 'sidecar', 'kohya', 'metadata_jsonl' or 'csv'" in message
    assert "dataset.caption_dropout: got 1.5" in message and "dataset.captioner: got 'clip:/x'; allowed" in message
    data["dataset"] = {"path": "x", "trigger_word": "zqx", "csv_file": "a.csv", "keep_tokens": 1}
    message = str(pytest.raises(SpecError, parse_spec, data).value)
    assert "csv_file = 'a.csv' is only used with source = 'csv'" in message and "keep_tokens = 1 only" in message
