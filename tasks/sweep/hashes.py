"""File hashes: sha256 for ids, and the hashes AUTOMATIC1111 and kohya show for models and LoRAs.

One cached hasher serves them all, keyed on each file's (path, size, mtime): planning runs several
times per sweep, and base models and LoRAs are large. No torch: safetensors headers are read as JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Literal

HASH_CHUNK = 1 << 20
LEGACY_HASH_OFFSET, LEGACY_HASH_LENGTH = 0x100000, 0x10000  # A1111's old model hash window
A1111_SHORT_HASH = 12  # digits A1111's Lora extension shows (network.py: shorthash = hash[0:12])

Stamps = tuple[tuple[str, int, int], ...]


def file_stamps(files: Sequence[str | Path]) -> Stamps:
    """(resolved path, size, mtime) of each file: a changed file gets a new cache key."""
    stamps = []
    for file in files:
        resolved = Path(file).resolve()
        stat = resolved.stat()
        stamps.append((str(resolved), stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


def file_sha256(path: str | Path) -> str:
    """sha256 of one file."""
    return cached_hash("sha256", file_stamps([path]))


def files_sha256(files: Sequence[str | Path]) -> str:
    """sha256 of the files read one after another."""
    return cached_hash("sha256", file_stamps(files))


def lora_short_hash(path: str | Path) -> str:
    """The hash A1111 shows for a LoRA file in "Lora hashes": its sshs_model_hash, else its addnet hash
    (for any .safetensors, kohya or diffusers format), cut to 12 hex digits."""
    return cached_hash("lora", file_stamps([path]))


@lru_cache(maxsize=512)
def cached_hash(kind: Literal["sha256", "lora"], stamps: Stamps) -> str:
    """The one hasher behind every file hash here, cached on (path, size, mtime) of its files."""
    if kind == "lora":
        (path, _, _), = stamps
        stored = safetensors_metadata(path).get("sshs_model_hash")
        if not stored:
            with open(path, "rb") as stream:
                stored = addnet_hash(stream)
        return stored[:A1111_SHORT_HASH]
    digest = hashlib.sha256()
    for name, _size, _mtime in stamps:
        with open(name, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (empty when it has none)."""
    with open(path, "rb") as stream:
        length = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(length))
    return header.get("__metadata__") or {}


def addnet_hash(stream: BinaryIO) -> str:
    """sha256 of a safetensors stream after its header: the tensor bytes alone, whatever the metadata."""
    stream.seek(0)
    header_length = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header_length)
    digest = hashlib.sha256()
    while chunk := stream.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def addnet_legacy_hash(stream: BinaryIO) -> str:
    """The additional-networks extension's old hash: 8 hex of sha256 of 0x10000 bytes at offset 0x100000
    (of nothing, for files under 1 MiB: A1111 hashes the same empty read)."""
    stream.seek(LEGACY_HASH_OFFSET)
    return hashlib.sha256(stream.read(LEGACY_HASH_LENGTH)).hexdigest()[:8]


def model_files(path: str) -> list[Path]:
    """What the model hashes cover: a single file itself, a diffusers folder its unet weights in name order."""
    base = Path(path)
    files = [base] if base.is_file() else sorted((base / "unet").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"base model {path}: nothing to hash (no file, no unet/*.safetensors)")
    return files


def model_sha256(path: str) -> str:
    """The full sha256 model_hash cuts: of the file, or of a folder's unet/*.safetensors read one after another."""
    return files_sha256(model_files(path))


def model_hash(path: str) -> str:
    """A1111-style short hash: first 10 hex digits of sha256 of the file (a folder: its unet weights)."""
    return model_sha256(path)[:10]


def legacy_model_hash(path: str) -> str:
    """A1111's old 8-hex model hash (kohya's ss_sd_model_hash): sha256 of the 0x10000 bytes at offset
    0x100000 of the bytes model_sha256 reads; empty when they are shorter than that, as A1111's is."""
    start, remaining, offset = LEGACY_HASH_OFFSET, LEGACY_HASH_LENGTH, 0
    digest = hashlib.sha256()
    for file in model_files(path):
        size = file.stat().st_size
        if remaining and offset + size > start:
            with open(file, "rb") as handle:
                handle.seek(start - offset)
                chunk = handle.read(remaining)
            digest.update(chunk)
            start, remaining = start + len(chunk), remaining - len(chunk)
        offset += size
    return digest.hexdigest()[:8]
