"""Base models: check a path before loading, load it as a StableDiffusionPipeline, and hash it.

Two layouts are accepted: a diffusers folder, or one original-SD `.safetensors` file (as civitai
ships checkpoints) plus `config=`, a local diffusers folder holding the configs and tokenizer that
offline single-file loading needs. Pickled weights (.ckpt/.pt/.bin) are refused: they can run code.
"""

from __future__ import annotations

import hashlib
import threading
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
CHECKPOINT_PREFIXES = {  # component -> key prefixes an original SD 1.x/2.x single file uses
    "UNet": ("model.diffusion_model.",),
    "VAE": ("first_stage_model.",),
    "text encoder": ("cond_stage_model.transformer.", "cond_stage_model.model."),
}
FOLDER_LAYOUT = "a diffusers folder needs model_index.json, unet/, vae/, text_encoder/ and tokenizer/"
HASH_CHUNK = 1 << 20
# Model loading (diffusers, transformers, accelerate) briefly builds modules on the meta device
# through process-wide patches; two threads doing it at once corrupt each other's modules.
# Hold this lock while loading a pipeline or adding/loading a LoRA adapter.
MODEL_BUILD_LOCK = threading.RLock()


def validate_base_model(path: str, config: str | None = None) -> list[str]:
    """Every problem with a base-model path (and its `config=` folder), found without loading weights."""
    base = Path(path)
    if not base.exists():
        return [
            f"base model {path}: does not exist; expected a diffusers folder or a single-file "
            ".safetensors checkpoint"
        ]
    if base.is_dir():
        problems = folder_problems(base)
        if config is not None:
            problems.append(
                f"base model {path}: config={config} only applies to a single-file checkpoint; "
                "leave it unset for a diffusers folder"
            )
        return problems
    return single_file_problems(base, config)


def folder_problems(folder: Path) -> list[str]:
    """Problems with a diffusers folder: missing index or components, or no safetensors weights."""
    problems = []
    if not (folder / "model_index.json").is_file():
        problems.append(f"base model {folder}: no model_index.json; {FOLDER_LAYOUT}")
    for name in COMPONENTS:
        if not (folder / name).is_dir():
            problems.append(f"base model {folder}: no {name}/ folder; {FOLDER_LAYOUT}")
        elif name in WEIGHT_COMPONENTS and not any((folder / name).glob("*.safetensors")):
            problems.append(
                f"base model {folder}: {name}/ holds no .safetensors weights; "
                "safetensors only (pickled .bin weights are refused)"
            )
    return problems


def single_file_problems(file: Path, config: str | None) -> list[str]:
    """Problems with a single-file checkpoint: pickle format, unreadable or incomplete, or no config."""
    suffix = file.suffix.lower()
    if suffix != ".safetensors":
        kind = "a pickle, which can run code when loaded" if suffix in PICKLE_SUFFIXES else "not safetensors"
        return [
            f"base model {file}: {file.suffix or 'no suffix'} is {kind}; "
            "safetensors only: a single file must end in .safetensors (or use a diffusers folder)"
        ]
    problems = checkpoint_key_problems(file)
    if config is None:
        problems.append(
            f"base model {file}: a single-file checkpoint needs config=<local diffusers folder with the "
            "configs and tokenizer (weights not needed)>; none given"
        )
    else:
        problems += config_folder_problems(Path(config), file)
    return problems


def checkpoint_key_problems(file: Path) -> list[str]:
    """Read only the safetensors header and report components an SD checkpoint must hold."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for a bad header
        return [f"base model {file}: not a readable safetensors file ({error}); expected an SD checkpoint"]
    expected = ", ".join(p for prefixes in CHECKPOINT_PREFIXES.values() for p in prefixes)
    return [
        f"base model {file}: no {' or '.join(p + '*' for p in prefixes)} weights ({component}); "
        f"expected an original Stable Diffusion checkpoint with {expected}"
        for component, prefixes in CHECKPOINT_PREFIXES.items()
        if not any(key.startswith(prefixes) for key in keys)
    ]


def config_folder_problems(config: Path, file: Path) -> list[str]:
    """Problems with the `config=` folder single-file loading reads offline."""
    where = f"config {config} (for base model {file})"
    if not config.is_dir():
        return [f"{where}: not a folder; expected a local diffusers folder with configs and tokenizer"]
    problems = [
        f"{where}: no {name}; expected a diffusers folder's configs and tokenizer (weights not needed)"
        for name in CONFIG_FILES
        if not (config / name).is_file()
    ]
    if not any((config / "tokenizer" / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{where}: no tokenizer/tokenizer.json or tokenizer/vocab.json; a CLIP tokenizer is needed")
    return problems


def load_pipeline(
    path: str,
    *,
    config: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> StableDiffusionPipeline:
    """Load a validated base model offline, safety checker off; raise ValueError listing every problem."""
    problems = validate_base_model(path, config)
    if problems:
        raise ValueError("invalid base model:\n" + "\n".join(f"- {p}" for p in problems))
    no_safety = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    with MODEL_BUILD_LOCK:
        return _load(path, config, torch_dtype, no_safety).to(device)


def _load(path: str, config: str | None, torch_dtype: torch.dtype, no_safety: dict) -> StableDiffusionPipeline:
    if Path(path).is_dir():
        return StableDiffusionPipeline.from_pretrained(
            path, torch_dtype=torch_dtype, local_files_only=True, use_safetensors=True, **no_safety
        )
    return StableDiffusionPipeline.from_single_file(
        path, config=config, torch_dtype=torch_dtype, local_files_only=True, **no_safety
    )


def model_hash(path: str) -> str:
    """A1111-style short hash: first 10 hex digits of sha256 of the file (a folder: its unet weights)."""
    base = Path(path)
    files = [base] if base.is_file() else sorted((base / "unet").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"base model {path}: nothing to hash (no file, no unet/*.safetensors)")
    stamps = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return hash_files(stamps)[:10]


@lru_cache(maxsize=256)
def hash_files(stamps: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the files in order, read in chunks; cached on (path, size, mtime) so reruns are free."""
    digest = hashlib.sha256()
    for name, _size, _mtime in stamps:
        with open(name, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
