"""Training datasets: image files with sidecar captions, checked before any training starts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class DatasetItem:
    """One training example: image path, caption text and a short content id."""

    image_id: str
    path: Path
    caption: str


class DatasetError(ValueError):
    """Every problem found in a dataset folder, one per line."""

    def __init__(self, folder: Path, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"dataset {folder}: {len(problems)} problem(s):\n{lines}")


def scan_dataset(
    folder: Path, *, caption_extension: str = ".txt", min_size: int = 8, min_images: int = 1
) -> list[DatasetItem]:
    """List image + caption pairs, reporting every missing caption, corrupt or too-small image at once."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, [f"dataset.path {str(folder)!r} is not a folder"])
    root = folder.resolve()
    problems: list[str] = []
    items: list[DatasetItem] = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        if not path.resolve().is_relative_to(root):
            problems.append(f"{path}: resolves outside the dataset folder {root}; links must stay inside it")
            continue
        item, problem = _check_item(path, caption_extension, min_size)
        if problem:
            problems.append(problem)
        elif item:
            items.append(item)
    if not problems and len(items) < min_images:
        allowed = ", ".join(IMAGE_SUFFIXES)
        problems.append(f"found {len(items)} images, need at least {min_images} (suffixes {allowed})")
    if problems:
        raise DatasetError(folder, problems)
    return items


def _check_item(path: Path, caption_extension: str, min_size: int) -> tuple[DatasetItem | None, str | None]:
    caption_path = path.with_suffix(caption_extension)
    if not caption_path.is_file():
        return None, f"{path.name}: caption file {caption_path.name} is missing"
    try:
        caption = caption_path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        return None, f"{caption_path.name}: caption is not UTF-8 text"
    if not caption:
        return None, f"{caption_path.name}: caption is empty"
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        return None, f"{path.name}: not a readable image ({err})"
    if min(width, height) < min_size:
        return None, f"{path.name}: {width}x{height} is smaller than the minimum side {min_size}px"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return DatasetItem(image_id=f"{path.stem}-{digest}", path=path, caption=caption), None


def dataset_fingerprint(items: list[DatasetItem]) -> str:
    """Content hash of images and captions: a changed dataset gives new run ids."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.image_id.encode())
        h.update(item.caption.encode())
    return h.hexdigest()[:16]


def load_training_image(path: Path, resolution: int) -> np.ndarray:
    """EXIF-rotate, convert to RGB, centre-crop to square and resize: HxWx3 float32 in [-1, 1]."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img = img.convert("RGB")
        img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0
