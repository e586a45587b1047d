"""Base models: check a path before loading, load it as its family's pipeline, and hash it.

Two families: SD1.x (`StableDiffusionPipeline`, family "sd15") and SDXL
(`StableDiffusionXLPipeline`, "sdxl"), told apart by model_index.json's `_class_name` (of the
folder, or of the `config=` folder for a single file). Two layouts are accepted: a diffusers
folder, or one original-SD `.safetensors` file (as civitai ships checkpoints) plus `config=`, a
local diffusers folder holding the configs and tokenizer that offline single-file loading needs.
Pickled weights (.ckpt/.pt/.bin) are refused: they can run code.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open

from tasks.sweep.model_family import PIPELINE_CLASSES, ModelFamily, index_family, model_family  # noqa: F401 (re-exported)

PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # besides COMPONENTS
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
SDXL_CHECKPOINT_PREFIXES = {  # the same for an original SDXL single file (sgm layout)
    "UNet": ("model.diffusion_model.",),
    "VAE": ("first_stage_model.",),
    "text encoders": ("conditioner.embedders.",),
}
FOLDER_LAYOUT = "a diffusers folder needs model_index.json, unet/, vae/, text_encoder/ and tokenizer/"
SDXL_LAYOUT = "an SDXL diffusers folder also needs text_encoder_2/ and tokenizer_2/"
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
    family: ModelFamily = "sd15"
    if not (folder / "model_index.json").is_file():
        problems.append(f"base model {folder}: no model_index.json; {FOLDER_LAYOUT}")
    else:
        family, problem = index_family(folder)
        problems += [f"base model {folder}: {problem}"] if problem else []
    extra = SDXL_COMPONENTS if family == "sdxl" else ()
    for name in COMPONENTS + extra:
        if not (folder / name).is_dir():
            layout = SDXL_LAYOUT if name in extra else FOLDER_LAYOUT
            problems.append(f"base model {folder}: no {name}/ folder; {layout}")
        elif name in WEIGHT_COMPONENTS + extra[:1] and not any((folder / name).glob("*.safetensors")):
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
    family = index_family(Path(config))[0] if config is not None and Path(config).is_dir() else "sd15"
    problems = checkpoint_key_problems(file, SDXL_CHECKPOINT_PREFIXES if family == "sdxl" else CHECKPOINT_PREFIXES)
    if config is None:
        problems.append(
            f"base model {file}: a single-file checkpoint needs config=<local diffusers folder with the "
            "configs and tokenizer (weights not needed)>; none given"
        )
    else:
        problems += config_folder_problems(Path(config), file)
    return problems


def checkpoint_key_problems(file: Path, expected_prefixes: dict[str, tuple[str, ...]] = CHECKPOINT_PREFIXES
                            ) -> list[str]:
    """Read only the safetensors header and report components an SD checkpoint must hold."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for a bad header
        return [f"base model {file}: not a readable safetensors file ({error}); expected an SD checkpoint"]
    expected = ", ".join(p for prefixes in expected_prefixes.values() for p in prefixes)
    return [
        f"base model {file}: no {' or '.join(p + '*' for p in prefixes)} weights ({component}); "
        f"expected an original Stable Diffusion checkpoint with {expected}"
        for component, prefixes in expected_prefixes.items()
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
    family, problem = index_family(config) if (config / "model_index.json").is_file() else ("sd15", None)
    problems += [f"{where}: {problem}"] if problem else []
    tokenizers = ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",)
    problems += [f"{where}: no {t}/tokenizer.json or {t}/vocab.json; a CLIP tokenizer is needed"
                 for t in tokenizers if not any((config / t / name).is_file() for name in TOKENIZER_FILES)]
    if family == "sdxl" and not (config / "text_encoder_2" / "config.json").is_file():
        problems.append(f"{where}: no text_encoder_2/config.json; an SDXL config folder needs both text encoders")
    return problems


def load_pipeline(
    path: str,
    *,
    config: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    unet_dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Load a validated base model offline as its family's pipeline, safety checker (SD1.x) and
    watermarker (SDXL) off; raise ValueError listing every problem.

    `unet_dtype` loads the UNet alone in that dtype (training's half precision): the same values as
    loading it in `torch_dtype` and casting after, without ever holding it in `torch_dtype` (an SDXL
    UNet is 10.3 GB in fp32, 5.1 GB in fp16), in memory or on the device.
    """
    problems = validate_base_model(path, config)
    if problems:
        raise ValueError("invalid base model:\n" + "\n".join(f"- {p}" for p in problems))
    family = model_family(path, config)
    extras = ({"add_watermarker": False} if family == "sdxl" else
              {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False})
    with MODEL_BUILD_LOCK:
        if unet_dtype is not None and unet_dtype != torch_dtype:
            extras["unet"] = _load(UNet2DConditionModel, path, config, unet_dtype, {"subfolder": "unet"})
        return _load(PIPELINES[family], path, config, torch_dtype, extras).to(device)


def _load(loader, path: str, config: str | None, torch_dtype: torch.dtype, extras: dict):
    """A pipeline class (or, with `subfolder` in `extras`, one of its models) from a folder or a single file."""
    if Path(path).is_dir():
        return loader.from_pretrained(
            path, torch_dtype=torch_dtype, local_files_only=True, use_safetensors=True, **extras
        )
    return loader.from_single_file(
        path, config=config, torch_dtype=torch_dtype, local_files_only=True, **extras
    )
