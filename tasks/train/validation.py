"""Validation loss: held-out images at fixed timesteps and fixed noise, so checkpoints compare.

`training.validation_images = k` holds k dataset images out of training (chosen by the run's
seed). At every checkpoint their denoising loss is measured at the same five timesteps with the
same noise, with the LoRA as it is at that step: a number that moves only because the weights
did, comparable across the checkpoints of a run (and across runs on the same dataset and seed).
The UNet is conditioned as in training (tasks.models.text_conditioning): SDXL also gets the pooled text
embedding and the images' size ids.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from tasks.data.dataset import DatasetItem, item_size, training_images
from tasks.models.text_conditioning import TextConditioning, encode_captions, size_ids, text_encoders

VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)
NOISE_SEED_OFFSET = 1_000_003  # validation noise never shares the training generator's stream


def split_validation(items: list[DatasetItem], count: int, seed: int) -> tuple[list[DatasetItem], list[DatasetItem]]:
    """(training items, held-out items): `count` items chosen by `seed`, both lists in dataset order."""
    if count <= 0:
        return list(items), []
    if count >= len(items):
        raise ValueError(f"training.validation_images = {count} leaves no training image (the dataset has "
                         f"{len(items)}); allowed: 0 to {len(items) - 1}")
    held = set(np.random.default_rng(seed).permutation(len(items))[:count].tolist())
    return ([item for i, item in enumerate(items) if i not in held],
            [item for i, item in enumerate(items) if i in held])


@dataclass(frozen=True)
class ValidationSet:
    """Held-out latents (VAE posterior mean), captions, SDXL size ids and one fixed noise draw per timestep."""

    latents: torch.Tensor  # (n, C, h, w), scaled
    noise: torch.Tensor  # (len(VALIDATION_TIMESTEPS), n, C, h, w)
    captions: tuple[str, ...]  # encoded at every checkpoint: a text-encoder LoRA changes them
    time_ids: torch.Tensor | None = None  # (n, 6) for SDXL, as tasks.train.run builds them; None for SD1.x


@torch.no_grad()
def prepare_validation(pipe, items: list[DatasetItem], resolution: int, seed: int, device: str) -> ValidationSet:
    """Encode the held-out images once (the VAE is frozen) and draw their noise from a fixed seed."""
    pixels = torch.from_numpy(training_images(items, resolution))
    vae = pipe.vae
    latents = torch.cat([vae.encode(chunk.to(device, vae.dtype)).latent_dist.mean.float().cpu()
                         for chunk in pixels.split(8)]) * vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET)
    noise = torch.randn((len(VALIDATION_TIMESTEPS), *latents.shape), generator=generator)
    sdxl = len(text_encoders(pipe)[0]) == 2
    time_ids = torch.tensor([size_ids(item_size(item), resolution) for item in items]) if sdxl else None
    return ValidationSet(latents, noise, tuple(item.caption for item in items), time_ids)


@torch.no_grad()
def validation_loss(pipe, validation: ValidationSet, device: str) -> float:
    """Mean denoising MSE over the held-out images and VALIDATION_TIMESTEPS, in eval mode (no dropout)."""
    unet = pipe.unet
    encoders, tokenizers = text_encoders(pipe)
    modules = [unet, *encoders]
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    frozen = next(p.dtype for n, p in unet.named_parameters() if "lora_" not in n)
    autocast = (torch.autocast("cuda" if device == "cuda" else "cpu", dtype=frozen)
                if frozen in (torch.float16, torch.bfloat16) else contextlib.nullcontext())
    try:
        with autocast:
            states, pooled = encode_captions(list(validation.captions), encoders, tokenizers, device)
            condition = TextConditioning(states, pooled, validation.time_ids).unet_kwargs(device)
            losses = []
            for k, t in enumerate(VALIDATION_TIMESTEPS):
                timesteps = torch.full((len(validation.latents),), t, dtype=torch.long)
                noise = validation.noise[k]
                noisy = scheduler.add_noise(validation.latents, noise, timesteps)
                target = (scheduler.get_velocity(validation.latents, noise, timesteps)
                          if scheduler.config.prediction_type == "v_prediction" else noise)
                prediction = unet(noisy.to(device), timesteps.to(device), **condition).sample
                losses.append(F.mse_loss(prediction.float().cpu(), target).item())
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
    return float(np.mean(losses))
