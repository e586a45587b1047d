"""How much memory a base model's frozen weights take, counted from its config files before it loads.

Each component (UNet, VAE, text encoders) is built on PyTorch's `meta` device, which allocates
nothing, and its parameters are counted: the bytes the weights alone take in a dtype. Activations,
gradients and optimizer states come on top, so this is a lower bound: a sweep whose weights alone
exceed the machine's memory cannot run, and is refused before any work.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

DTYPE_BYTES = {"fp32": 4, "no": 4, "fp16": 2, "bf16": 2}


BUILDERS = {
    "unet": lambda config: UNet2DConditionModel.from_config(config),
    "vae": lambda config: AutoencoderKL.from_config(config),
    "text_encoder": lambda config: CLIPTextModel(CLIPTextConfig.from_dict(config)),
    "text_encoder_2": lambda config: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config)),
}


@lru_cache(maxsize=32)
def meta_component(config_file: Path) -> torch.nn.Module:
    """The component a `<component>/config.json` describes, built on the meta device: shapes, no memory."""
    build = BUILDERS[config_file.parent.name]
    with torch.device("meta"):
        return build(json.loads(config_file.read_text()))


def component_params(model_dir: Path) -> dict[str, int]:
    """Parameter count of each component whose config.json the diffusers folder (or config folder) holds."""
    files = {name: model_dir / name / "config.json" for name in BUILDERS}
    return {name: sum(p.numel() for p in meta_component(file).parameters())
            for name, file in files.items() if file.is_file()}


def training_weight_bytes(model_dir: Path, mixed_precision: str) -> int:
    """Frozen weights while training: UNet and text encoders in the mixed-precision dtype, the VAE in fp32
    (tasks.train.loop.setup)."""
    counts = component_params(model_dir)
    half = DTYPE_BYTES[mixed_precision]
    return sum(n * (DTYPE_BYTES["fp32"] if name == "vae" else half) for name, n in counts.items())


def render_weight_bytes(model_dir: Path, precision: str) -> int:
    """Every component in the render precision (tasks.render.job)."""
    return sum(component_params(model_dir).values()) * DTYPE_BYTES[precision]


def device_memory_bytes(device: str) -> int:
    """The memory training and rendering get on `device`: the GPU's, or this machine's RAM."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
