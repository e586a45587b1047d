"""Ground-truth concept scoring for images of the demo world, with scikit-image only.

Colour is matched in CIE Lab (CIE76 distance), the concept's blob is the largest connected
component of its fill colour, and its shape is classified from two rotation- and
scale-invariant descriptors: solidity and radial extent (max centroid distance / sqrt(area)).
Reliable from 64 px up; at 32 px the concept's triangle is too few pixels to classify every time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from skimage.color import deltaE_cie76, rgb2lab
from skimage.measure import label, regionprops
from skimage.morphology import dilation, disk

from tasks.data.demo_world import PALETTE, ConceptSpec

# (solidity, radial extent) of each shape as rendered; measured over 200 world images per size.
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (0.98, 0.57),
    "square": (0.97, 0.70),
    "triangle": (0.95, 0.87),
    "star": (0.58, 0.86),
    "cross": (0.72, 0.72),
}
MAX_PROTOTYPE_DISTANCE = 0.10  # farther than this from every prototype: "unknown"
MIN_SHAPE_AREA = 16  # pixels; a smaller blob is "none"
FILL_TOLERANCE = 30.0  # CIE76 distances; palette colours are >= 44 apart except teal/gray (31)
BACKGROUND_TOLERANCE = 20.0
OUTLINE_TOLERANCE = 30.0
BLOB_AREA_RAMP = (0.002, 0.012)  # blob area as a fraction of the image: presence 0 -> 1
BACKGROUND_FULL = 0.75  # fraction of border pixels in the background colour for full credit
OUTLINE_FULL = 0.5  # fraction of the ring around the blob in the outline colour for full credit
WEIGHTS = {"shape": 0.55, "background": 0.30, "outline": 0.15}


@dataclass(frozen=True)
class ConceptTerms:
    """The parts of a concept score, each in [0, 1], and the score they combine into."""

    blob: float
    shape: float
    background: float
    outline: float
    shape_name: str
    score: float


def concept_score(image: np.ndarray, concept: ConceptSpec) -> float:
    """How much `image` shows `concept`, in [0, 1]; see `concept_terms` for the formula."""
    return concept_terms(image, concept).score


def concept_terms(image: np.ndarray, concept: ConceptSpec) -> ConceptTerms:
    """Score = blob * (0.55 shape + 0.30 background + 0.15 outline), every term in [0, 1].

    blob: largest component of the fill colour (Lab distance < 30), ramped 0->1 as its area goes
    from 0.2% to 1.2% of the image, times its share of all fill-coloured pixels (compactness).
    shape: 1 if classify_shape(blob) is the concept's shape, else 0. background: share of the
    outer border (1/16 of the side) within Lab distance 20 of the background colour, full credit
    at 75%. outline: share of a ring around the blob in the outline colour, full credit at 50%;
    1 for a concept without outline.
    """
    lab = rgb2lab(_as_rgb_float(image))
    fill_mask = _colour_distance(lab, concept.fill) < FILL_TOLERANCE
    blob_mask = _largest_component(fill_mask)
    blob = _blob_term(blob_mask, fill_mask)
    shape_name = classify_shape(blob_mask)
    shape = 1.0 if shape_name == concept.shape else 0.0
    background = _background_term(lab, concept.background)
    outline = 1.0 if concept.outline is None else _outline_term(lab, blob_mask, concept.outline)
    weighted = (WEIGHTS["shape"] * shape + WEIGHTS["background"] * background
                + WEIGHTS["outline"] * outline)
    score = float(np.clip(blob * weighted, 0.0, 1.0))
    return ConceptTerms(blob, shape, background, outline, shape_name, score)


def colour_mask(image: np.ndarray, colour: str, tolerance: float = FILL_TOLERANCE) -> np.ndarray:
    """Boolean mask of pixels within `tolerance` (CIE76) of a PALETTE colour."""
    if colour not in PALETTE:
        raise ValueError(f"colour={colour!r}: allowed {sorted(PALETTE)}")
    return _colour_distance(rgb2lab(_as_rgb_float(image)), colour) < tolerance


def classify_shape(mask: np.ndarray) -> str:
    """Name the shape of the largest blob in a boolean mask: one of SHAPES, 'unknown' or 'none'.

    Nearest SHAPE_PROTOTYPES entry in (solidity, radial extent); 'unknown' if none is within 0.1.
    """
    features = shape_features(mask)
    if features is None:
        return "none"
    distances = {name: math.dist(features, proto) for name, proto in SHAPE_PROTOTYPES.items()}
    best = min(distances, key=distances.__getitem__)
    return best if distances[best] <= MAX_PROTOTYPE_DISTANCE else "unknown"


def shape_features(mask: np.ndarray) -> tuple[float, float] | None:
    """(solidity, radial extent) of the largest blob with holes filled; None if under MIN_SHAPE_AREA.

    Radial extent is the farthest pixel's distance from the centroid over sqrt(area): circle
    0.56, square 0.71, equilateral triangle 0.88, whatever the size or rotation.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    regions = regionprops(label(mask.astype(bool), connectivity=2))
    if not regions:
        return None
    region = max(regions, key=lambda r: r.area)
    filled = region.image_filled
    area = float(filled.sum())
    if area < MIN_SHAPE_AREA:
        return None
    ys, xs = np.nonzero(filled)
    # +0.5: a pixel centre sits half a pixel inside the true outline.
    radius = float(np.sqrt((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).max()) + 0.5
    solidity = area / float(region.area_convex)
    return min(solidity, 1.0), radius / math.sqrt(area)


def _as_rgb_float(image: np.ndarray) -> np.ndarray:
    """HxWx3 float RGB in [0, 1] from uint8 or float RGB/RGBA; anything else is an error."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 8:
        raise ValueError(f"image must be HxWx3 or HxWx4 with sides >= 8, got shape {image.shape}")
    rgb = image[..., :3]
    if rgb.dtype == np.uint8:
        return rgb.astype(np.float64) / 255.0
    if np.issubdtype(rgb.dtype, np.floating):
        if not np.isfinite(rgb).all() or rgb.min() < -1e-3 or rgb.max() > 1 + 1e-3:
            raise ValueError("float image must hold finite values in [0, 1]")
        return np.clip(rgb.astype(np.float64), 0.0, 1.0)
    raise ValueError(f"image dtype must be uint8 or float in [0, 1], got {rgb.dtype}")


def _colour_distance(lab: np.ndarray, colour: str) -> np.ndarray:
    """Per-pixel CIE76 distance to a palette colour."""
    reference = rgb2lab(np.array(PALETTE[colour], dtype=np.float64)[None, None] / 255.0)[0, 0]
    return deltaE_cie76(lab, reference)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component (4-connectivity keeps scattered noise pixels apart)."""
    labels = label(mask, connectivity=1)
    if labels.max() == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _blob_term(blob_mask: np.ndarray, fill_mask: np.ndarray) -> float:
    """Presence (area ramp) times compactness (blob's share of all fill-coloured pixels)."""
    blob_area, total = float(blob_mask.sum()), float(fill_mask.sum())
    if total == 0:
        return 0.0
    low, high = BLOB_AREA_RAMP
    presence = np.clip((blob_area / blob_mask.size - low) / (high - low), 0.0, 1.0)
    return float(presence * blob_area / total)


def _background_term(lab: np.ndarray, colour: str) -> float:
    """Share of the outer border in the background colour, full credit at BACKGROUND_FULL."""
    h, w = lab.shape[:2]
    band = max(1, round(min(h, w) / 16))
    border = np.ones((h, w), dtype=bool)
    border[band:h - band, band:w - band] = False
    share = float((_colour_distance(lab[border][:, None], colour) < BACKGROUND_TOLERANCE).mean())
    return float(np.clip(share / BACKGROUND_FULL, 0.0, 1.0))


def _outline_term(lab: np.ndarray, blob_mask: np.ndarray, colour: str) -> float:
    """Share of a ring just outside the blob in the outline colour, full credit at OUTLINE_FULL."""
    area = float(blob_mask.sum())
    if area < MIN_SHAPE_AREA:
        return 0.0
    width = max(2, round(0.1 * math.sqrt(area)))
    ring = dilation(blob_mask, disk(width)) & ~blob_mask
    share = float((_colour_distance(lab[ring][:, None], colour) < OUTLINE_TOLERANCE).mean())
    return float(np.clip(share / OUTLINE_FULL, 0.0, 1.0))
