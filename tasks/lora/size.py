"""How many bytes one checkpoint folder of a run will take, from the base model's configs, before training.

The rule (docs/faults.md): the LoRA's parameters P come from the UNet built on PyTorch's `meta` device
(shapes only, no memory) and the run's target modules, as peft matches them: a linear layer adds
rank x (in + out), a convolution rank x (in x kernel area + out); a trained text encoder adds
rank x 2 x hidden for each of its attention projections. A checkpoint holds P in fp32 five times (the
diffusers file, the kohya file, and in training_state.pt the LoRA and AdamW's two moments), plus a
few KiB per adapted layer for names and headers, the loss history and a fixed allowance for
checkpoint.json, the kohya metadata and the RNG states. DoRA (its magnitude per input column or output
row), LoHa and LoKr count their own parameters per adapted layer (tasks.lora.networks.layer_params), as
does a LoCon whose k x k convolutions have their own rank (training.conv_rank).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from tasks.lora.networks import conv_rank_alpha, dora_axis, layer_params, targeted
from tasks.models.memory import meta_component
from tasks.sweep.plan import TrainingRunSpec
from tasks.sweep.presets import TEXT_ENCODER_TARGETS

BYTES_PER_PARAM = 4  # LoRA weights train and are saved in fp32 (tasks.train.loop.add_adapters)
COPIES = 5  # diffusers file, kohya file, and training_state.pt's LoRA and two AdamW moments
PER_LAYER_BYTES = 4 * 2**10  # tensor names, safetensors headers and pickle records of one adapted layer
PER_STEP_BYTES = 64  # the loss and learning-rate history in training_state.pt
FIXED_BYTES = 256 * 2**10  # checkpoint.json, kohya metadata and hashes, RNG and scheduler states


@lru_cache(maxsize=16)
def unet_lora_widths(config_file: Path, targets: tuple[str, ...]) -> tuple[int, int]:
    """(parameters per unit of rank, adapted layers) of a LoRA on the UNet described by `config_file`."""
    width = layers = 0
    for name, module in meta_component(config_file).named_modules():
        if not targeted(name, targets):
            continue
        if isinstance(module, torch.nn.Linear):
            width, layers = width + module.in_features + module.out_features, layers + 1
        elif isinstance(module, torch.nn.Conv2d):
            area = module.kernel_size[0] * module.kernel_size[1]
            width, layers = width + module.in_channels * area + module.out_channels, layers + 1
    return width, layers


def text_encoder_lora_widths(model_dir: Path) -> tuple[int, int]:
    """(parameters per unit of rank, adapted layers) of the LoRA on every text encoder of the model folder."""
    width = layers = 0
    for name in ("text_encoder", "text_encoder_2"):
        config_file = model_dir / name / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            count = int(config["num_hidden_layers"]) * len(TEXT_ENCODER_TARGETS)
            width, layers = width + count * 2 * int(config["hidden_size"]), layers + count
    return width, layers


def checkpoint_bytes(run: TrainingRunSpec) -> int | None:
    """Bytes one checkpoint folder of `run` takes at most; None when the UNet's config cannot be read
    (base model validation reports that)."""
    model_dir = Path(run.base_model.config or run.base_model_path)
    try:
        width, layers = unet_lora_widths(model_dir / "unet" / "config.json", tuple(run.target_modules))
        if run.train_text_encoder:
            text_width, text_layers = text_encoder_lora_widths(model_dir)
            width, layers = width + text_width, layers + text_layers
        params = run.rank * width
        if run.network != "lora" or run.conv_rank is not None:  # counted layer by layer (networks.layer_params)
            params = adapter_params(model_dir, run)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (COPIES * BYTES_PER_PARAM * params + PER_LAYER_BYTES * layers + PER_STEP_BYTES * run.max_steps
            + FIXED_BYTES)


def adapter_params(model_dir: Path, run: TrainingRunSpec) -> int:
    """Trainable parameters of `run`'s adapter of any type, from the configs (meta device, no weights)."""
    layers = [m for name, m in meta_component(model_dir / "unet" / "config.json").named_modules()
              if targeted(name, run.target_modules) and isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    for name in ("text_encoder", "text_encoder_2") if run.train_text_encoder else ():
        config_file = model_dir / name / "config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            hidden = int(config["hidden_size"])
            count = int(config["num_hidden_layers"]) * len(TEXT_ENCODER_TARGETS)
            layers += [torch.nn.Linear(hidden, hidden, device="meta")] * count
    conv_rank = conv_rank_alpha(run)[0]  # k x k convolutions (LoCon) may have their own rank
    return sum(layer_params(run.network, m, conv_rank if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
                            else run.rank, run.lokr_factor, dora_axis(run)) for m in layers)
