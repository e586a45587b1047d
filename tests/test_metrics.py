"""Metrics on images with known answers: identities, formulas, copies, flat and checkered images."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from skimage.filters import gaussian
from skimage.metrics import structural_similarity

from tasks.score import image_features
from tasks.score.image_features import PSNR_CAP_DB, SsimStats, TrainingSetFeatures, edge_density, laplacian_variance
from tasks.score.metrics import (
    GROUP_METRICS,
    MEMORIZATION_SSIM_THRESHOLD,
    METRICS,
    MetricInputs,
    MetricValue,
    compute_image_metrics,
    diversity_across_seeds,
    metric,
)

SIZE = 64


def textured(seed: int, size: int = SIZE) -> np.ndarray:
    """A smooth random colour field with detail: unrelated seeds give unrelated images."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((size // 8, size // 8, 3))
    base = np.kron(coarse, np.ones((8, 8, 1)))
    return np.clip((0.7 * base + 0.3 * rng.random((size, size, 3))) * 255, 0, 255).astype(np.uint8)


def checkerboard(square: int = 8, size: int = SIZE) -> np.ndarray:
    """Black and white squares of `square` px."""
    ij = np.indices((size, size)) // square
    return np.repeat(((ij[0] + ij[1]) % 2 * 255).astype(np.uint8)[..., None], 3, axis=2)


def by_name(values: list[MetricValue]) -> dict[str, MetricValue]:
    """Index metric rows by metric name."""
    return {v.metric: v for v in values}


@pytest.fixture(scope="module")
def training() -> TrainingSetFeatures:
    """Five unrelated textured images, ids t0..t4."""
    return TrainingSetFeatures.from_images([f"t{i}" for i in range(5)], [textured(i) for i in range(5)])


def test_ssim_and_psnr_of_identical_images() -> None:
    image = textured(0)
    rows = by_name(compute_image_metrics(image, baseline=image.copy(), training=None, baseline_id="b"))
    assert rows["ssim_vs_baseline"].value == pytest.approx(1.0, abs=1e-12)
    assert rows["psnr_vs_baseline_db"].value == PSNR_CAP_DB
    assert rows["psnr_vs_baseline_db"].reference_id == "b"


def test_psnr_matches_formula_for_known_noise() -> None:
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    signs = np.random.default_rng(0).choice([-5, 5], size=image.shape)
    noisy = (image.astype(int) + signs).astype(np.uint8)  # |error| = 5 everywhere: MSE = 25
    rows = by_name(compute_image_metrics(noisy, baseline=image, training=None))
    assert rows["psnr_vs_baseline_db"].value == pytest.approx(10 * np.log10(255**2 / 25))


def test_batched_ssim_equals_skimage() -> None:
    x = image_features.analysis_gray(textured(0))
    ys = np.stack([image_features.analysis_gray(textured(i)) for i in (1, 2)] + [x])
    expected = [structural_similarity(x, y, data_range=1.0) for y in ys]
    np.testing.assert_allclose(image_features.ssim_values(SsimStats.of(x[None]), SsimStats.of(ys)), expected, atol=1e-10)


def test_nearest_training_image_finds_exact_copy(training: TrainingSetFeatures) -> None:
    rows = by_name(compute_image_metrics(textured(3), baseline=None, training=training))
    assert rows["nearest_training_ssim"].value == pytest.approx(1.0, abs=1e-12)
    assert rows["nearest_training_ssim"].reference_id == "t3"
    assert rows["memorized_flag"].value == 1.0
    assert rows["memorized_flag"].reference_id == "t3"


def test_unrelated_image_is_not_memorized(training: TrainingSetFeatures) -> None:
    rows = by_name(compute_image_metrics(textured(99), baseline=None, training=training))
    assert rows["nearest_training_ssim"].value < MEMORIZATION_SSIM_THRESHOLD
    assert rows["memorized_flag"].value == 0.0


def test_style_distance_zero_for_training_image_larger_for_recoloured(training: TrainingSetFeatures) -> None:
    same = by_name(compute_image_metrics(textured(2), baseline=None, training=training))
    recoloured = by_name(compute_image_metrics(255 - textured(2), baseline=None, training=training))
    for name in ("style_distance", "style_color_chi2", "style_texture_lbp_chi2",
                 "style_edge_density_gap_fraction"):
        assert same[name].value == pytest.approx(0.0, abs=1e-12), name
        assert same[name].reference_id == "t2"
    assert recoloured["style_color_chi2"].value > 0.1
    assert recoloured["style_distance"].value > same["style_distance"].value


def test_style_of_other_palette_is_farther() -> None:
    reds = [np.clip(textured(i) * [1.0, 0.2, 0.2], 0, 255).astype(np.uint8) for i in range(3)]
    features = TrainingSetFeatures.from_images(["a", "b", "c"], reds)
    red_render = np.clip(textured(7) * [1.0, 0.2, 0.2], 0, 255).astype(np.uint8)
    blue_render = red_render[..., ::-1].copy()
    red = by_name(compute_image_metrics(red_render, baseline=None, training=features))
    blue = by_name(compute_image_metrics(blue_render, baseline=None, training=features))
    assert blue["style_color_chi2"].value > red["style_color_chi2"].value
    assert blue["style_distance"].value > red["style_distance"].value


def test_blur_lowers_sharpness() -> None:
    image = textured(0)
    blurred = (gaussian(image, sigma=2, channel_axis=-1) * 255).round().astype(np.uint8)
    assert laplacian_variance(blurred) < laplacian_variance(image)
    rows, blurred_rows = (by_name(compute_image_metrics(im, baseline=None, training=None))
                          for im in (image, blurred))
    assert blurred_rows["sharpness_laplacian_var"].value < rows["sharpness_laplacian_var"].value


def test_edge_density_flat_is_zero_checkerboard_positive() -> None:
    flat = np.full((SIZE, SIZE, 3), 90, np.uint8)
    assert edge_density(flat) == 0.0
    assert edge_density(checkerboard()) > 0.05
    rows = by_name(compute_image_metrics(flat, baseline=None, training=None))
    assert rows["edge_density_fraction"].value == 0.0


def test_diversity_of_identical_is_zero_of_different_positive() -> None:
    assert diversity_across_seeds([textured(0)] * 3) == pytest.approx(0.0, abs=1e-12)
    assert diversity_across_seeds([textured(0), textured(1), textured(2)]) > 0.3
    with pytest.raises(ValueError, match="at least 2 images"):
        diversity_across_seeds([textured(0)])


def test_missing_inputs_skip_metrics(training: TrainingSetFeatures) -> None:
    image = textured(0)
    alone = {v.metric for v in compute_image_metrics(image, baseline=None, training=None)}
    assert alone == {n for n, d in METRICS.items() if not d.needs}
    full = compute_image_metrics(image, baseline=textured(1), training=training)
    assert [v.metric for v in full] == list(METRICS)
    assert all(np.isfinite(v.value) for v in full)
    assert all(v.higher_is_better == METRICS[v.metric].higher_is_better for v in full)


def test_float_images_in_unit_range_match_uint8(training: TrainingSetFeatures) -> None:
    image = textured(4)
    as_uint8 = compute_image_metrics(image, baseline=None, training=training)
    as_float = compute_image_metrics(image / 255.0, baseline=None, training=training)
    assert as_float == as_uint8


def test_bad_images_are_rejected_with_reason() -> None:
    with pytest.raises(ValueError, match=r"HxWx3"):
        compute_image_metrics(np.zeros((8, 8), np.uint8), baseline=None, training=None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compute_image_metrics(np.full((8, 8, 3), -1.0), baseline=None, training=None)
    with pytest.raises(ValueError, match="baseline shape"):
        compute_image_metrics(textured(0), baseline=textured(0, size=32), training=None)


def test_training_set_reports_every_problem() -> None:
    with pytest.raises(ValueError) as err:
        TrainingSetFeatures.from_images(["a", "a", "b"], [textured(0), np.zeros((4, 4), np.uint8)])
    message = str(err.value)
    assert "3 ids but 2 images" in message
    assert "duplicate ids ['a']" in message
    assert "HxWx3" in message


def test_registry_names_unique_and_directions_declared() -> None:
    names = list(METRICS) + list(GROUP_METRICS)
    assert len(names) == len(set(names))
    for definition in [*METRICS.values(), *GROUP_METRICS.values()]:
        assert isinstance(definition.higher_is_better, bool), definition.name
        assert definition.description, definition.name
    assert GROUP_METRICS["seed_diversity_1_minus_ssim"].fn is diversity_across_seeds


@pytest.fixture()
def scratch_metric() -> Iterator[str]:
    """A metric name removed from the registry after the test."""
    yield "mean_red_fraction"
    METRICS.pop("mean_red_fraction", None)


def test_new_metric_registers_with_one_decorator(scratch_metric: str) -> None:
    @metric(scratch_metric, higher_is_better=False)
    def _mean_red(inputs: MetricInputs) -> float:
        """Mean of the red channel, 0-1."""
        return float(inputs.image[..., 0].mean() / 255)

    rows = by_name(compute_image_metrics(checkerboard(), baseline=None, training=None))
    assert rows[scratch_metric] == MetricValue(scratch_metric, 0.5, False, None)


def test_bad_declarations_are_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        metric("ssim_vs_baseline", higher_is_better=True)
    with pytest.raises(ValueError) as err:
        metric("Bad Name", higher_is_better=None, needs=("reference",))  # type: ignore[arg-type]
    assert "snake_case" in str(err.value) and "True or False" in str(err.value)
    assert "'reference'" in str(err.value)
