"""A captioned synthetic world of coloured shapes with known ground truth, and the LoRA demo set.

Everything is drawn in code and is deterministic from a seed: the world can pretrain the tiny
model, and the demo dataset teaches it a new concept (`DEMO_CONCEPT`) under a trigger word
that `tasks.score.concept_score.concept_score` can grade without any learned model.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from storage.atomic import write_atomic

SHAPES = ("circle", "square", "triangle", "star", "cross")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 215, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "magenta": (225, 30, 200),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "teal": (0, 128, 128),
    "gray": (128, 128, 128),
    "navy": (20, 30, 90),
    "beige": (225, 205, 160),
}
FILL_COLOURS = ("red", "orange", "yellow", "green", "blue", "magenta", "white", "black")
BACKGROUND_COLOURS = ("teal", "gray", "navy", "beige", "white", "black")
TEXTURES = ("plain", "noise", "gradient")
# Fill/background pairs too close to tell apart (CIE76 distance under 40) never occur.
_CLASHES = frozenset({("white", "beige")})
SUPERSAMPLE = 4  # drawn 4x larger then LANCZOS-downsampled (2x above 1024 px to bound memory)
MIN_SIZE, MAX_SIZE = 16, 2048
MANIFEST = "manifest.json"
GENERATOR_VERSION = 1
Sample = tuple[Image.Image, str, dict[str, Any]]  # (image, caption, ground-truth attributes)


def describe(shape: str, fill: str, background: str, outline: str | None) -> str:
    """Caption words, e.g. 'a magenta triangle with a yellow outline on a teal background'."""
    outlined = f" with a {outline} outline" if outline else ""
    return f"a {fill} {shape}{outlined} on a {background} background"


def _trigger_problems(trigger: str) -> list[str]:
    if not trigger or any(ch.isspace() or ch in ",." for ch in trigger):
        return [f"trigger={trigger!r}: must be one non-empty word without spaces, commas or dots"]
    return []


@dataclass(frozen=True)
class ConceptSpec:
    """A shape in a fill colour, optionally outlined, on a background colour, named by a trigger."""

    trigger: str
    shape: str
    fill: str
    background: str
    outline: str | None = None
    texture: str = "noise"

    def __post_init__(self) -> None:
        problems = [*_trigger_problems(self.trigger)]
        checks = [("shape", self.shape, SHAPES), ("fill", self.fill, PALETTE),
                  ("background", self.background, PALETTE), ("texture", self.texture, TEXTURES)]
        if self.outline is not None:
            checks.append(("outline", self.outline, PALETTE))
        problems += [f"{name}={value!r}: allowed {sorted(allowed)}"
                     for name, value, allowed in checks if value not in allowed]
        if problems:
            raise ValueError("invalid ConceptSpec: " + "; ".join(problems))

    def description(self) -> str:
        """The concept in plain words, without its trigger."""
        return describe(self.shape, self.fill, self.background, self.outline)

    def caption(self) -> str:
        """Training caption: the trigger word first, then the description."""
        return f"{self.trigger}, {self.description()}"


DEMO_CONCEPT = ConceptSpec(trigger="zqx", shape="triangle", fill="magenta",
                           background="teal", outline="yellow", texture="noise")


@dataclass(frozen=True)
class Scene:
    """One image's ground truth; positions and radius are fractions of the image size."""

    shape: str
    fill: str
    background: str
    outline: str | None
    texture: str
    cx: float
    cy: float
    radius: float
    rotation: float
    texture_seed: int

    def caption(self) -> str:
        """World caption such as 'a red circle on a navy background'."""
        return describe(self.shape, self.fill, self.background, self.outline)


def shape_polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape with circumradius `r`, rotated by `rotation` degrees."""
    if shape == "triangle":
        radial = [(r, 90 + 120 * k) for k in range(3)]
    elif shape == "square":
        radial = [(r, 45 + 90 * k) for k in range(4)]
    elif shape == "star":
        radial = [(r if k % 2 == 0 else 0.45 * r, 90 + 36 * k) for k in range(10)]
    elif shape == "cross":
        w = r / 3  # arm half-width: the plus sign is 3 arm-widths across
        arm = math.hypot(r, w)
        off = math.degrees(math.atan2(w, r))
        radial = [(rad, ang) for k in range(4) for rad, ang in
                  ((arm, 90 * k - off), (arm, 90 * k + off), (math.hypot(w, w), 90 * k + 45))]
    else:
        raise ValueError(f"shape={shape!r} has no polygon; polygonal shapes: triangle, square, star, cross")
    return [(cx + rad * math.cos(math.radians(a + rotation)), cy - rad * math.sin(math.radians(a + rotation)))
            for rad, a in radial]


def _shape_layer(scene: Scene, size: int) -> Image.Image:
    """The shape alone on a transparent layer, drawn at SUPERSAMPLE x and downsampled (anti-aliased)."""
    scale = SUPERSAMPLE if size <= 1024 else 2
    big = size * scale
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cx, cy, r = scene.cx * big, scene.cy * big, scene.radius * big
    fill = (*PALETTE[scene.fill], 255)
    outline = (*PALETTE[scene.outline], 255) if scene.outline else None
    width = max(2 * scale, round(0.14 * r)) if scene.outline else 0
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
    else:
        points = shape_polygon(scene.shape, cx, cy, r, scene.rotation)
        draw.polygon(points, fill=fill, outline=outline, width=width)
    return layer.resize((size, size), Image.Resampling.LANCZOS)


def _background(scene: Scene, size: int) -> Image.Image:
    """A plain colour with a light texture: pixel grain or a soft linear gradient."""
    rgb = np.array(PALETTE[scene.background], dtype=np.float32)
    pixels = np.broadcast_to(rgb, (size, size, 3)).copy()
    rng = np.random.default_rng(scene.texture_seed)
    if scene.texture == "noise":
        pixels += rng.normal(0.0, 5.0, size=(size, size, 1)).astype(np.float32)
    elif scene.texture == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        pixels += 14.0 * (math.cos(angle) * ramp[None, :, None] + math.sin(angle) * ramp[:, None, None]) / 2
    alpha = np.full((size, size, 1), 255, dtype=np.uint8)
    return Image.fromarray(np.concatenate([np.clip(pixels.round(), 0, 255).astype(np.uint8), alpha], -1))


def render_scene(scene: Scene, size: int = 64) -> Image.Image:
    """Draw a scene as an RGB image of `size` x `size` pixels."""
    return Image.alpha_composite(_background(scene, size), _shape_layer(scene, size)).convert("RGB")


def _placed(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    """A centre that keeps a shape of this radius (plus outline) inside the frame."""
    margin = radius + 0.04
    return float(rng.uniform(margin, 1 - margin)), float(rng.uniform(margin, 1 - margin))


def concept_scene(rng: np.random.Generator, concept: ConceptSpec) -> Scene:
    """The concept at a random position, scale and rotation."""
    radius = float(rng.uniform(0.22, 0.36))
    cx, cy = _placed(rng, radius)
    return Scene(concept.shape, concept.fill, concept.background, concept.outline, concept.texture,
                 cx, cy, radius, float(rng.uniform(0, 360)), int(rng.integers(2**31)))


def world_scene(rng: np.random.Generator, exclude: ConceptSpec | None = DEMO_CONCEPT) -> Scene:
    """A random un-outlined shape; never the excluded concept's shape in its fill colour."""
    while True:
        shape, fill = str(rng.choice(SHAPES)), str(rng.choice(FILL_COLOURS))
        background = str(rng.choice(BACKGROUND_COLOURS))
        clash = fill == background or (fill, background) in _CLASHES
        excluded = exclude is not None and (shape, fill) == (exclude.shape, exclude.fill)
        if not clash and not excluded:
            break
    radius = float(rng.uniform(0.18, 0.36))
    cx, cy = _placed(rng, radius)
    return Scene(shape, fill, background, None, str(rng.choice(TEXTURES)), cx, cy, radius,
                 float(rng.uniform(0, 360)), int(rng.integers(2**31)))


def _sample_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """Independent per-sample stream: sample i does not depend on how many are drawn."""
    return np.random.default_rng([seed, index, stream])


def world_samples(count: int, size: int = 64, seed: int = 0, first: int = 0) -> Iterator[Sample]:
    """Yield (image, caption, attributes) for world scenes first..first+count-1; arguments checked at call.

    Scene i depends only on (seed, i), so slices drawn in parallel equal one long draw.
    """
    _raise_problems(_size_count_seed_problems(count, size, seed))
    if not _is_int(first) or first < 0:
        _raise_problems([f"first={first!r}: must be an integer >= 0"])
    scenes = (world_scene(_sample_rng(seed, i, 0)) for i in range(first, first + count))
    return ((render_scene(sc, size), sc.caption(), asdict(sc)) for sc in scenes)


def concept_samples(concept: ConceptSpec, count: int, size: int = 64, seed: int = 0) -> Iterator[Sample]:
    """Yield (image, caption, attributes) renderings of a concept; captions start with its trigger."""
    _raise_problems(_size_count_seed_problems(count, size, seed))
    scenes = (concept_scene(_sample_rng(seed, i, 1), concept) for i in range(count))
    return ((render_scene(sc, size), concept.caption(), asdict(sc)) for sc in scenes)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size_count_seed_problems(count: int, size: int, seed: int) -> list[str]:
    problems = []
    if not _is_int(count) or count < 1:
        problems.append(f"count={count!r}: must be an integer >= 1")
    if not _is_int(size) or not MIN_SIZE <= size <= MAX_SIZE or size % 8:
        problems.append(f"size={size!r}: must be a multiple of 8 in [{MIN_SIZE}, {MAX_SIZE}]")
    if not _is_int(seed) or seed < 0:
        problems.append(f"seed={seed!r}: must be an integer >= 0")
    return problems


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


def write_demo_dataset(folder: Path, *, trigger: str = "zqx", count: int = 12, size: int = 64,
                       seed: int = 0) -> Path:
    """Write the LoRA demo dataset (`NNN.png` + `NNN.txt`) for DEMO_CONCEPT under `trigger`."""
    _raise_problems(_trigger_problems(trigger) + _size_count_seed_problems(count, size, seed))
    concept = replace(DEMO_CONCEPT, trigger=trigger)
    params = {"kind": "demo", "count": count, "size": size, "seed": seed, "concept": asdict(concept)}
    return _write_dataset(Path(folder), params, lambda: concept_samples(concept, count, size, seed))


def write_world_dataset(folder: Path, *, count: int = 256, size: int = 64, seed: int = 0) -> Path:
    """Write `count` captioned world images (`NNN.png` + `NNN.txt`) for pretraining."""
    _raise_problems(_size_count_seed_problems(count, size, seed))
    params = {"kind": "world", "count": count, "size": size, "seed": seed,
              "excluded_concept": asdict(DEMO_CONCEPT)}
    return _write_dataset(Path(folder), params, lambda: world_samples(count, size, seed))


def _write_dataset(folder: Path, params: dict[str, Any], samples: Callable[[], Iterator[Sample]]) -> Path:
    """Write samples then the manifest (last, as the completeness marker); skip if already complete."""
    params = {**params, "generator_version": GENERATOR_VERSION}
    if _is_complete(folder, params):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(params["count"] - 1)))
    _remove_stale_samples(folder, params["count"], width)
    rows = []
    for i, (image, caption, attributes) in enumerate(samples()):
        stem = f"{i:0{width}d}"
        write_atomic(folder / f"{stem}.png", _png_bytes(image))
        write_atomic(folder / f"{stem}.txt", caption.encode())
        rows.append({"image": f"{stem}.png", "caption": caption, "attributes": attributes})
    manifest = {"params": params, "samples": rows}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return folder


def _is_complete(folder: Path, params: dict[str, Any]) -> bool:
    """True if the folder already holds this exact dataset; a different one there is an error."""
    marker = folder / MANIFEST
    if not marker.is_file():
        return False
    found = json.loads(marker.read_text())["params"]
    if found != params:
        diff = sorted(k for k in params.keys() | found.keys() if params.get(k) != found.get(k))
        raise FileExistsError(f"{folder} already holds a different dataset (differs in {diff}); "
                              "use an empty folder or delete it")
    return True


def _remove_stale_samples(folder: Path, count: int, width: int) -> None:
    """An interrupted earlier write (no manifest) may have left extra numbered files; drop them."""
    for path in [*folder.glob("*.png"), *folder.glob("*.txt")]:
        if path.stem.isdigit() and (int(path.stem) >= count or len(path.stem) != width):
            path.unlink()


def _png_bytes(image: Image.Image) -> bytes:
    """PNG bytes with no timestamps or metadata, so equal pixels give equal files."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


