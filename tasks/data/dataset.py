"""Training datasets: image files with sidecar captions, checked before any training starts.

Also the image side of preprocessing (mode conversion, crop, aspect-ratio buckets) and the
summary printed before training. Other caption sources live in `tasks/data/sources.py`.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import CLIPTokenizer

from tasks.assets import CLIP_TOKENIZER_DIR

# Raster image suffixes Pillow reads: a file with one is expected to be an image, so a damaged one is a
# bad file rather than ignored. Any other file Pillow recognises by its content is an image too.
READABLE_SUFFIXES = frozenset(
    ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and ext in {
        ".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff",
        ".avif", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".psd", ".jp2", ".j2k", ".qoi", ".ico"})
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112
SUMMARY_LIST_MAX = 10  # files listed by name in the summary; the rest are counted
MIN_IMAGE_SIDE = 64  # px: smaller images are refused (or skipped), up to the training resolution


@dataclass(frozen=True)
class DatasetItem:
    """One training example: image path, caption text and a short content id.

    `repeats` is how often the item is seen per epoch (kohya `N_name` folders): sample items with
    weight `repeats`. `size` is (width, height) after EXIF rotation. An empty caption awaits a captioner.
    """

    image_id: str
    path: Path
    caption: str
    repeats: int = 1
    size: tuple[int, int] = field(default=(0, 0), compare=False)


class DatasetError(ValueError):
    """Every problem found in a dataset folder, one per line."""

    def __init__(self, folder: Path, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"dataset {folder}: {len(problems)} problem(s):\n{lines}")


@dataclass
class ScanProblems:
    """What a scan found besides its items. A bad file (unreadable or too small image, caption missing,
    empty or not UTF-8) is an error, or with `skip_bad_files` (dataset.on_bad_file = "skip") left out
    and listed in `skipped`. Files that are not images at all are listed in `not_images`."""

    skip_bad_files: bool = False
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)

    def bad_file(self, problem: str) -> None:
        (self.skipped if self.skip_bad_files else self.errors).append(problem)

    def merge(self, other: ScanProblems, prefix: str) -> None:
        """Add a sub-folder's findings, each named with the sub-folder `prefix`."""
        for mine, theirs in ((self.errors, other.errors), (self.skipped, other.skipped),
                             (self.not_images, other.not_images)):
            mine += [f"{prefix}{p}" for p in theirs]


def scan_dataset(
    folder: Path, *, caption_extension: str = ".txt", min_size: int = 8, min_images: int = 1,
    allow_missing_captions: bool = False, repeats: int = 1, problems: ScanProblems | None = None,
) -> list[DatasetItem]:
    """List image + caption pairs, reporting every missing caption, corrupt or too-small image at once.

    Images are found by content: every file Pillow opens, whatever its suffix. With `problems` given,
    findings go there and the caller checks the count; without, they raise DatasetError here.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, [f"dataset.path {str(folder)!r} is not a folder"])
    found = problems if problems is not None else ScanProblems()
    items: list[DatasetItem] = []
    for path in image_files(folder, caption_extension, found):
        caption, problem = _sidecar_caption(path, caption_extension, allow_missing_captions)
        item = None
        if problem is None:
            item, problem = inspect_image(path, folder, caption or "", min_size=min_size, repeats=repeats)
        if problem:
            found.bad_file(problem)
        elif item:
            items.append(item)
    if problems is None:
        check_count(folder, items, found, min_images)
    return items


def image_files(folder: Path, caption_extension: str, problems: ScanProblems) -> list[Path]:
    """Every file under `folder` that is an image by content (Pillow opens it), or claims to be one by
    its suffix (a damaged image is then a bad file, not silently ignored). Other files are listed as
    not images; caption files and hidden files (.DS_Store, .git/) are passed over."""
    images = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() == caption_extension.lower():
            continue
        if path.suffix.lower() in READABLE_SUFFIXES or opens_as_image(path):
            images.append(path)
        else:
            problems.not_images.append(f"{relative}: not an image (no format Pillow reads)")
    return images


def opens_as_image(path: Path) -> bool:
    """Pillow recognises the file's content as an image format it can read."""
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def check_count(folder: Path, items: list[DatasetItem], problems: ScanProblems, min_images: int) -> None:
    """Raise DatasetError with every error, or when fewer than `min_images` items were found."""
    if not problems.errors and len(items) < min_images:
        skipped = (f" ({len(problems.skipped)} bad file(s) skipped: {'; '.join(problems.skipped)})"
                   if problems.skipped else "")
        problems.errors.append(f"found {len(items)} images{skipped}, need at least {min_images} "
                               "(any image format Pillow reads: PNG, JPEG, WebP, BMP, TIFF, GIF, ...)")
    if problems.errors:
        raise DatasetError(folder, problems.errors)


def _sidecar_caption(path: Path, caption_extension: str, allow_missing: bool) -> tuple[str | None, str | None]:
    caption_path = path.with_suffix(caption_extension)
    if not caption_path.is_file():
        return ("", None) if allow_missing else (None, f"{path.name}: caption file {caption_path.name} is missing")
    try:
        # utf-8-sig: Windows editors start files with a byte-order mark, which is not caption text.
        caption = caption_path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        return None, f"{caption_path.name}: caption is not UTF-8 text"
    if not caption and not allow_missing:
        return None, f"{caption_path.name}: caption is empty"
    return caption, None


def inspect_image(path: Path, root: Path, caption: str, *, min_size: int,
                  repeats: int = 1) -> tuple[DatasetItem | None, str | None]:
    """Check one image (inside `root`, readable, big enough) and make its DatasetItem."""
    if not path.resolve().is_relative_to(Path(root).resolve()):
        return None, f"{path}: resolves outside the dataset folder {Path(root).resolve()}; links must stay inside it"
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return None, f"{path.name}: not a readable image ({err})"
    if min(width, height) < min_size:
        return None, f"{path.name}: {width}x{height} is smaller than the minimum side {min_size}px"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return DatasetItem(f"{path.stem}-{digest}", path, caption, repeats, (width, height)), None


def dataset_fingerprint(items: list[DatasetItem]) -> str:
    """Content hash of images, captions and repeats: a changed dataset gives new run ids."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.image_id.encode())
        h.update(item.caption.encode())
        if item.repeats != 1:  # keeps the ids of datasets without repeats unchanged
            h.update(f"x{item.repeats}".encode())
    return h.hexdigest()[:16]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: transparency on white, 16-bit scaled (65535 -> 255), CMYK/L/P converted."""
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_training_image(path: Path, resolution: int, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """EXIF-rotate, convert to RGB, centre-crop and resize to `size` (w, h; default square).

    Returns HxWx3 float32 in [-1, 1]."""
    with Image.open(path) as img:
        img = to_rgb(ImageOps.exif_transpose(img))
        img = ImageOps.fit(img, size or (resolution, resolution), method=Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def training_images(items: list[DatasetItem], resolution: int) -> np.ndarray:
    """Every item as load_training_image prepares it, stacked channels-first: N x 3 x H x W float32."""
    return np.stack([load_training_image(item.path, resolution).transpose(2, 0, 1) for item in items])


def crop_sizes(items: list[DatasetItem], resolution: int, bucket_step: int | None = None) -> list[tuple[int, int]]:
    """The (w, h) each item is cropped to for training: a `resolution` square, or with `bucket_step`
    its aspect-ratio bucket (assign_buckets)."""
    if bucket_step is None:
        return [(resolution, resolution)] * len(items)
    return assign_buckets([item_size(item) for item in items], resolution, bucket_step)


def item_size(item: DatasetItem) -> tuple[int, int]:
    """(width, height) after EXIF rotation: as scanned, or read from the file when the item lacks it."""
    if min(item.size) > 0:
        return item.size
    with Image.open(item.path) as img:
        return ImageOps.exif_transpose(img).size


def bucket_resolutions(resolution: int, step: int = 64) -> list[tuple[int, int]]:
    """Bucket sizes (w, h): multiples of `step`, area <= resolution^2, aspect between 1:2 and 2:1."""
    area = resolution * resolution
    buckets = set()
    for width in range(step, 2 * resolution + 1, step):
        height = area // width // step * step
        if height >= step and 0.5 <= width / height <= 2.0:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets) or [(resolution, resolution)]


def assign_buckets(sizes: list[tuple[int, int]], resolution: int, step: int = 64) -> list[tuple[int, int]]:
    """The bucket (w, h) for each image size: closest aspect ratio, larger area on ties (kohya/SDXL style)."""
    buckets = bucket_resolutions(resolution, step)
    chosen = []
    for width, height in sizes:
        aspect = np.log(width / height)
        chosen.append(min(buckets, key=lambda b: (round(abs(np.log(b[0] / b[1]) - aspect), 9), -b[0] * b[1])))
    return chosen


@dataclass(frozen=True)
class DatasetSummary:
    """What the trainer is about to see; `format()` gives the table printed before training."""

    num_items: int
    samples_per_epoch: int
    repeats: dict[int, int]
    widths: tuple[int, int, int]
    heights: tuple[int, int, int]
    buckets: dict[tuple[int, int], int]
    missing_captions: int
    without_trigger: int
    long_captions: int
    long_examples: tuple[str, ...]
    max_tokens: int
    skipped: tuple[str, ...] = ()  # bad files left out (dataset.on_bad_file = "skip"), with the reason
    not_images: tuple[str, ...] = ()  # files in the folder that are not images

    def format(self) -> str:
        """A short text table, one fact per line."""
        rows: list[tuple[str, Any]] = [
            ("images", self.num_items), ("samples per epoch", self.samples_per_epoch),
            ("repeats", ", ".join(f"{r}x: {n}" for r, n in sorted(self.repeats.items()))),
            ("width min/median/max", "/".join(map(str, self.widths))),
            ("height min/median/max", "/".join(map(str, self.heights))),
            ("buckets", ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items()))),
            ("captions missing", self.missing_captions), ("captions without trigger", self.without_trigger),
            (f"captions > {self.max_tokens} tokens", self.long_captions),
        ]
        rows += [("  e.g.", example) for example in self.long_examples]
        for label, entries in (("bad files skipped", self.skipped), ("not images, ignored", self.not_images)):
            if entries:
                rows.append((label, len(entries)))
                rows += [("  -", entry) for entry in entries[:SUMMARY_LIST_MAX]]
                if len(entries) > SUMMARY_LIST_MAX:
                    rows.append(("  -", f"... and {len(entries) - SUMMARY_LIST_MAX} more"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def dataset_summary(items: list[DatasetItem], tokenizer: Any = None, *, resolution: int = 512,
                    trigger_word: str | None = None, step: int | None = 64, skipped: tuple[str, ...] = (),
                    not_images: tuple[str, ...] = ()) -> DatasetSummary:
    """Counts, repeats, sizes, the crop sizes training uses (aspect-ratio buckets of `step`; None:
    all one square) and (with a CLIP tokenizer) captions that would be truncated."""
    sizes = [item.size for item in items if min(item.size) > 0]
    max_tokens = getattr(tokenizer, "model_max_length", 77) if tokenizer is not None else 77
    long = []
    if tokenizer is not None:
        tokens = tokenizer([i.caption for i in items], truncation=False, verbose=False).input_ids
        lengths = [len(ids) for ids in tokens]
        long = [(n, i.caption) for n, i in zip(lengths, items) if n > max_tokens]
    return DatasetSummary(
        num_items=len(items), samples_per_epoch=sum(item.repeats for item in items),
        repeats=dict(Counter(item.repeats for item in items)),
        widths=_spread([w for w, _ in sizes]), heights=_spread([h for _, h in sizes]),
        buckets=dict(Counter(crop_sizes(items, resolution, step))),
        missing_captions=sum(not item.caption for item in items),
        without_trigger=sum(bool(trigger_word) and trigger_word not in item.caption for item in items),
        long_captions=len(long),
        long_examples=tuple(f"{n} tokens: {c[:60]}..." for n, c in long[:3]), max_tokens=max_tokens,
        skipped=skipped, not_images=not_images,
    )


@lru_cache(maxsize=1)
def load_clip_tokenizer() -> Any:
    """The real CLIP BPE tokenizer shipped in tasks/assets, for counting caption tokens; loaded once per
    process (0.13 s each time here): preflight and every render job count with it. Shared: do not modify it."""
    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))


def _spread(values: list[int]) -> tuple[int, int, int]:
    if not values:
        return (0, 0, 0)
    return (min(values), int(statistics.median(values)), max(values))
