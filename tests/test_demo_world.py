"""The demo world: deterministic captioned shapes, the trigger-word dataset, and its ground-truth score."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data.demo_world import (
    DEMO_CONCEPT,
    MANIFEST,
    SHAPES,
    ConceptSpec,
    Scene,
    concept_samples,
    render_scene,
    world_samples,
    write_demo_dataset,
    write_world_dataset,
)
from tasks.score.concept_score import (
    SHAPE_PROTOTYPES,
    classify_shape,
    colour_mask,
    concept_score,
    concept_terms,
)


def _scores(samples, concept: ConceptSpec = DEMO_CONCEPT) -> np.ndarray:
    return np.array([concept_score(np.asarray(image), concept) for image, _, _ in samples])


@pytest.mark.parametrize("size", [64, 128])
def test_concept_images_score_high(size: int) -> None:
    scores = _scores(concept_samples(DEMO_CONCEPT, 20, size, seed=3))
    assert scores.mean() > 0.9 and scores.min() > 0.8, scores


def test_concept_scores_high_at_512() -> None:
    (image, _, _), = concept_samples(DEMO_CONCEPT, 1, 512, seed=0)
    assert image.size == (512, 512)
    assert concept_score(np.asarray(image), DEMO_CONCEPT) > 0.8


def test_world_images_score_low() -> None:
    samples = list(world_samples(120, 64, seed=5))
    scores = _scores(samples)
    assert scores.mean() < 0.1
    # No world image has the concept's shape in its fill colour, nor an outline: at most the
    # background weight (0.30) can be earned, and only by a magenta blob.
    assert scores.max() <= 0.3 + 1e-9
    other_fill = [s for s, (_, _, attrs) in zip(scores, samples) if attrs["fill"] != DEMO_CONCEPT.fill]
    assert max(other_fill) < 0.05


@pytest.mark.parametrize("size", [64, 128])
def test_random_noise_scores_low(size: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        assert concept_score(noise, DEMO_CONCEPT) < 0.05
    assert concept_score(np.zeros((size, size, 3), np.uint8), DEMO_CONCEPT) == 0.0


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        (replace(DEMO_CONCEPT, outline=None), 0.85),  # loses the outline weight
        (replace(DEMO_CONCEPT, background="gray"), 0.70),  # loses the background weight
        (replace(DEMO_CONCEPT, shape="circle"), 0.45),  # loses the shape weight
        (replace(DEMO_CONCEPT, fill="red"), 0.0),  # no magenta blob: nothing counts
    ],
)
def test_partial_concepts_get_partial_credit(variant: ConceptSpec, expected: float) -> None:
    scores = _scores(concept_samples(variant, 6, 64, seed=1))
    np.testing.assert_allclose(scores, expected, atol=0.02)


def test_score_terms_and_input_forms_agree() -> None:
    (image, _, _), = concept_samples(DEMO_CONCEPT, 1, 64, seed=2)
    pixels = np.asarray(image)
    terms = concept_terms(pixels, DEMO_CONCEPT)
    assert terms.shape_name == "triangle" and terms.shape == 1.0
    assert 0.0 <= terms.score <= 1.0 and terms.score == concept_score(pixels, DEMO_CONCEPT)
    rgba = np.asarray(image.convert("RGBA"))
    assert concept_score(pixels / 255.0, DEMO_CONCEPT) == pytest.approx(terms.score)
    assert concept_score(rgba, DEMO_CONCEPT) == pytest.approx(terms.score)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((64, 64), np.uint8), "HxWx3"),
        (np.zeros((64, 64, 3), np.int32), "dtype"),
        (np.full((64, 64, 3), 2.0), r"\[0, 1\]"),
    ],
)
def test_concept_score_rejects_bad_images(bad: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        concept_score(bad, DEMO_CONCEPT)


@pytest.mark.parametrize("size", [64, 128])
def test_classify_shape_recognises_world_shapes(size: int) -> None:
    samples = list(world_samples(40, size, seed=11))
    hits = [classify_shape(colour_mask(np.asarray(image), attrs["fill"])) == attrs["shape"]
            for image, _, attrs in samples]
    assert np.mean(hits) >= 0.9
    assert {attrs["shape"] for _, _, attrs in samples} == set(SHAPES)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rotation", [0.0, 17.0, 45.0])
def test_classify_shape_each_shape_any_rotation(shape: str, rotation: float) -> None:
    scene = Scene(shape, "red", "gray", None, "plain", 0.5, 0.5, 0.25, rotation, 0)
    image = np.asarray(render_scene(scene, 96))
    assert classify_shape(colour_mask(image, "red")) == shape


def test_classify_shape_edge_cases() -> None:
    assert set(SHAPE_PROTOTYPES) == set(SHAPES)
    empty = np.zeros((32, 32), bool)
    assert classify_shape(empty) == "none"
    speck = empty.copy()
    speck[3:5, 3:5] = True
    assert classify_shape(speck) == "none"
    line = empty.copy()
    line[15:17, 1:31] = True
    assert classify_shape(line) == "unknown"
    with pytest.raises(ValueError, match="2-D"):
        classify_shape(np.zeros((4, 4, 3), bool))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_demo_dataset_layout_and_captions(tmp_path: Path) -> None:
    folder = write_demo_dataset(tmp_path / "demo", trigger="sks", count=5)
    pngs, txts = sorted(folder.glob("*.png")), sorted(folder.glob("*.txt"))
    assert [p.name for p in pngs] == [f"{i:03d}.png" for i in range(5)]
    assert [p.stem for p in txts] == [p.stem for p in pngs]
    assert set(_files(folder)) == {p.name for p in pngs + txts} | {MANIFEST}
    for txt in txts:
        assert txt.read_text() == "sks, a magenta triangle with a yellow outline on a teal background"
    assert concept_score(np.asarray(Image.open(pngs[0])), DEMO_CONCEPT) > 0.8


def test_demo_dataset_is_deterministic(tmp_path: Path) -> None:
    first = _files(write_demo_dataset(tmp_path / "a", count=4, seed=9))
    assert first == _files(write_demo_dataset(tmp_path / "b", count=4, seed=9))
    other = _files(write_demo_dataset(tmp_path / "c", count=4, seed=10))
    assert first["000.png"] != other["000.png"]


def test_demo_dataset_is_idempotent(tmp_path: Path) -> None:
    folder = write_demo_dataset(tmp_path / "demo", count=3)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert write_demo_dataset(folder, count=3) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    with pytest.raises(FileExistsError, match="count"):
        write_demo_dataset(folder, count=4)


def test_interrupted_dataset_is_rewritten(tmp_path: Path) -> None:
    reference = _files(write_demo_dataset(tmp_path / "ref", count=3))
    folder = tmp_path / "partial"
    write_demo_dataset(folder, count=5)
    (folder / MANIFEST).unlink()  # as if the earlier run died before its marker
    (folder / "001.png").write_bytes(b"truncated")
    assert _files(write_demo_dataset(folder, count=3)) == reference


@pytest.mark.parametrize("size", [128, 512])
def test_demo_dataset_other_sizes(tmp_path: Path, size: int) -> None:
    folder = write_demo_dataset(tmp_path / "demo", count=1, size=size)
    with Image.open(folder / "000.png") as image:
        assert image.size == (size, size) and image.mode == "RGB"


def test_bad_arguments_are_all_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        write_demo_dataset(tmp_path, trigger="two words", count=0, size=60, seed=-1)
    for needle in ("trigger='two words'", "count=0", "size=60", "seed=-1"):
        assert needle in str(info.value)
    with pytest.raises(ValueError) as info:
        ConceptSpec(trigger="zqx", shape="hexagon", fill="mauve", background="teal")
    assert "shape='hexagon'" in str(info.value) and "fill='mauve'" in str(info.value)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="count=0"):
        world_samples(0)  # checked at call, not at first iteration


def test_world_samples_are_deterministic_and_captioned() -> None:
    first = list(world_samples(30, 64, seed=4))
    again = list(world_samples(10, 64, seed=4))
    for (a, cap_a, attrs_a), (b, cap_b, attrs_b) in zip(first, again):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and cap_a == cap_b and attrs_a == attrs_b
    for _, caption, attrs in first:
        assert caption == f"a {attrs['fill']} {attrs['shape']} on a {attrs['background']} background"
        assert (attrs["shape"], attrs["fill"]) != (DEMO_CONCEPT.shape, DEMO_CONCEPT.fill)
        assert attrs["fill"] != attrs["background"] and attrs["outline"] is None
    other = next(world_samples(1, 64, seed=5))[0]
    assert not np.array_equal(np.asarray(first[0][0]), np.asarray(other))


def test_world_dataset_files(tmp_path: Path) -> None:
    folder = write_world_dataset(tmp_path / "world", count=4, size=64, seed=1)
    captions = [p.read_text() for p in sorted(folder.glob("*.txt"))]
    assert len(captions) == len(list(folder.glob("*.png"))) == 4
    assert captions == [caption for _, caption, _ in world_samples(4, 64, seed=1)]
