"""Caption fidelity: how closely a render of a training caption (render.caption_prompts) matches the image
that caption came from. High for trained captions means the LoRA reproduces what it saw (memorisation, or a
faithful subject); held-out captions' images were never trained on, so theirs measures generalisation.

Compared as the other training-image metrics compare (tasks.score.image_features: centre crop to square,
ANALYSIS_SIZE px), against that one image only: SSIM of luma, chi-square distances of the joint RGB
histogram and of the LBP texture histogram, and, with a local CLIP model (metrics.clip_model), the cosine
similarity of the two CLIP image embeddings. reference_id names the source image.
"""

from __future__ import annotations

import numpy as np

from tasks.score.image_features import ImageFeatures, SsimStats, TrainingSetFeatures, as_rgb_uint8, chi2, ssim_values
from tasks.score.metrics import GROUP_METRICS, METRICS, MetricValue

SSIM_METRIC = "caption_ssim"  # higher is better: 1 = the source image's structure exactly
COLOR_METRIC = "caption_color_chi2"  # lower is better, in [0, 1]
TEXTURE_METRIC = "caption_texture_lbp_chi2"  # lower is better, in [0, 1]
CLIP_METRIC = "caption_clip_similarity"  # higher is better: cosine of CLIP image embeddings, up to 1
HIGHER_IS_BETTER = {SSIM_METRIC: True, COLOR_METRIC: False, TEXTURE_METRIC: False, CLIP_METRIC: True}
assert not set(HIGHER_IS_BETTER) & {*METRICS, *GROUP_METRICS}, "caption metric names must be unique"


def source_index(ids: tuple[str, ...], source_id: str) -> int:
    """Where the caption's source image sits among the scored training images; ValueError when it is absent
    (the dataset changed after the sweep was planned)."""
    try:
        return ids.index(source_id)
    except ValueError:
        raise ValueError(f"caption prompt source image {source_id!r} is not in the dataset any more "
                         f"({len(ids)} images); re-plan the sweep") from None


def caption_metrics(image: np.ndarray, source_id: str, training: TrainingSetFeatures) -> list[MetricValue]:
    """SSIM, colour and texture distances of one render to its caption's source image."""
    index = source_index(training.ids, source_id)
    features = ImageFeatures.of(as_rgb_uint8(image))
    ssim = float(ssim_values(SsimStats.of(features.gray[None]), training.ssim[index:index + 1])[0])
    color = float(chi2(features.color_hist, training.color_hists[index]))
    texture = float(chi2(features.lbp_hist, training.lbp_hists[index]))
    values = {SSIM_METRIC: ssim, COLOR_METRIC: color, TEXTURE_METRIC: texture}
    return [MetricValue(name, value, HIGHER_IS_BETTER[name], source_id) for name, value in values.items()]


def caption_clip_metrics(image_embeddings: np.ndarray, source_ids: list[str], training_ids: tuple[str, ...],
                         training_embeddings: np.ndarray) -> list[MetricValue]:
    """Cosine similarity of each render's unit CLIP embedding to its source image's (rows in order)."""
    if len(image_embeddings) != len(source_ids):
        raise ValueError(f"got {len(image_embeddings)} image embeddings but {len(source_ids)} source ids")
    rows = []
    for embedding, source_id in zip(image_embeddings, source_ids):
        similarity = float(embedding @ training_embeddings[source_index(training_ids, source_id)])
        rows.append(MetricValue(CLIP_METRIC, similarity, True, source_id))
    return rows
