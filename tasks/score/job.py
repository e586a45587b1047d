"""Score one render job's images: every registered image metric, seed diversity per grid cell,
for a caption prompt's image its fidelity to the caption's source image (tasks.score.caption_fidelity),
and, for the builtin demo world, the ground-truth concept score.

Reads the PNGs and the job's `images` rows from disk and writes `image_metrics` rows for the
job, so scoring can be re-run or extended without re-rendering.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from tasks.data.demo_world import DEMO_CONCEPT
from tasks.data.sources import load_items
from tasks.score.caption_fidelity import caption_clip_metrics, caption_metrics
from tasks.score.clip_metrics import ClipScorer
from tasks.score.concept_score import concept_score
from tasks.score.image_features import TrainingSetFeatures
from tasks.score.metrics import GROUP_METRICS, compute_image_metrics, diversity_across_seeds
from tasks.sweep.plan import RenderJobSpec
from tasks.sweep.spec import DatasetSpec

log = logging.getLogger(__name__)
CONCEPT_METRIC = "concept_score"  # in [0, 1]; ground truth of the demo world, higher is better
DIVERSITY_METRIC = next(iter(GROUP_METRICS))
CELL_AXES = ("sampler", "steps", "cfg_scale", "lora_weight", "prompt_index", "clip_skip")


def score_job(job: RenderJobSpec) -> Path:
    """Write the job's `image_metrics` Parquet file (skipped when it already exists)."""
    layout = SweepLayout(Path(job.sweep_root))
    out = layout.table_file("image_metrics", job.render_id)
    if out.exists():
        return out
    images = pq.read_table(layout.table_file("images", job.render_id)).to_pylist()
    training = _training_features(job.dataset_path, job.dataset.model_dump_json())
    baseline_paths = _baseline_paths(layout, job)
    rows: list[dict[str, object]] = []
    pixels: dict[str, np.ndarray] = {}
    for image in images:
        pixels[image["image_id"]] = array = _load(image["path"])
        key = _baseline_key(image)
        baseline_path = baseline_paths.get(key) if job.baseline_render_id else None
        baseline_id = Path(baseline_path).stem if baseline_path else None
        values = compute_image_metrics(array, baseline=_load(baseline_path) if baseline_path else None,
                                       training=training, baseline_id=baseline_id)
        if image.get("source_image"):
            values += caption_metrics(array, image["source_image"], training)
        rows += [_row(job, image["image_id"], v.metric, v.value, v.higher_is_better, v.reference_id) for v in values]
        if job.concept_trigger:
            concept = replace(DEMO_CONCEPT, trigger=job.concept_trigger)
            rows.append(_row(job, image["image_id"], CONCEPT_METRIC, concept_score(array, concept), True, None))
    rows += _diversity_rows(job, images, pixels)
    if job.clip_model_path:
        rows += _clip_rows(job, images, pixels)
    return write_rows("image_metrics", rows, out)


def _clip_rows(job: RenderJobSpec, images: list[dict], pixels: dict[str, np.ndarray]) -> list[dict[str, object]]:
    """CLIP text-image score and CLIP similarity to the training set, batched over the job; a caption
    prompt's image also gets its CLIP similarity to its source image."""
    scorer, training = _clip_scorer(job.clip_model_path, job.dataset_path, job.dataset.model_dump_json())
    scores = scorer.score([pixels[i["image_id"]] for i in images], [i["prompt"] for i in images], training)
    captioned = [i for i in images if i.get("source_image")]
    if captioned:
        embeddings = scorer.embed_images([pixels[i["image_id"]] for i in captioned], [i["image_id"] for i in captioned])
        fidelity = caption_clip_metrics(embeddings, [i["source_image"] for i in captioned], training.ids,
                                        training.embeddings)
        scores = [*scores, *([v] for v in fidelity)]
        images = [*images, *captioned]
    return [_row(job, image["image_id"], v.metric, v.value, v.higher_is_better, v.reference_id)
            for image, values in zip(images, scores) for v in values]


@lru_cache(maxsize=2)
def _clip_scorer(model_path: str, dataset_path: str, dataset_json: str):
    scorer = ClipScorer.from_pretrained(model_path)
    items = _training_items(dataset_path, dataset_json)
    return scorer, scorer.embed_training([i.image_id for i in items], [_load(str(i.path)) for i in items])


def _diversity_rows(job: RenderJobSpec, images: list[dict], pixels: dict[str, np.ndarray]) -> list[dict[str, object]]:
    """Seed diversity of each grid cell, written on every image of that cell."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for image in images:
        cells[tuple(image.get(a) for a in CELL_AXES)].append(image)
    rows = []
    higher = GROUP_METRICS[DIVERSITY_METRIC].higher_is_better
    for members in cells.values():
        if len(members) < 2:
            continue
        value = diversity_across_seeds([pixels[m["image_id"]] for m in members])
        rows += [_row(job, m["image_id"], DIVERSITY_METRIC, value, higher, None) for m in members]
    return rows


def _baseline_key(image: dict) -> tuple:
    """The cell an image shares with its no-LoRA twin (columns added later read as their old meaning)."""
    return (image["sampler"], image["steps"], image["cfg_scale"], image["prompt"], image["seed"],
            image.get("clip_skip") or 1, image.get("source_image"))


def _baseline_paths(layout: SweepLayout, job: RenderJobSpec) -> dict[tuple, str]:
    if not job.baseline_render_id:
        return {}
    table = layout.table_file("images", job.baseline_render_id)
    if not table.exists():
        log.warning("render %s: baseline %s has no images; drift metrics skipped", job.render_id,
                    job.baseline_render_id)
        return {}
    return {_baseline_key(r): r["path"] for r in pq.read_table(table).to_pylist()}


def _training_items(dataset_path: str, dataset_json: str) -> list:
    """The training images as the run saw them (any dataset source); no captioner: captions are not needed."""
    return load_items(DatasetSpec.model_validate_json(dataset_json), Path(dataset_path), min_size=8)


@lru_cache(maxsize=8)
def _training_features(dataset_path: str, dataset_json: str) -> TrainingSetFeatures:
    items = _training_items(dataset_path, dataset_json)
    return TrainingSetFeatures.from_images([i.image_id for i in items], [_load(str(i.path)) for i in items])


def _load(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _row(job: RenderJobSpec, image_id: str, metric: str, value: float, higher: bool,
         reference: str | None) -> dict[str, object]:
    return {"sweep_id": job.sweep_id, "image_id": image_id, "metric": metric, "value": float(value),
            "higher_is_better": higher, "reference_id": reference}
