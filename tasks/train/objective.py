"""The training objective: the noise a step adds (offset noise) and the loss it minimises (Min-SNR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(shape: torch.Size, generator: torch.Generator, offset: float) -> torch.Tensor:
    """Gaussian noise; with `offset` (offset noise), plus one random shift per image and channel,
    which lets the model learn overall brightness (very dark or bright images)."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                   min_snr_gamma: float | None) -> torch.Tensor:
    """Mean squared error; with `min_snr_gamma`, each example is weighted by min(SNR, gamma) / SNR
    (/ (SNR + 1) for v-prediction), so the many easy low-noise timesteps stop dominating (Min-SNR)."""
    if min_snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    denominator = snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr
    weights = snr.clamp(max=min_snr_gamma) / denominator
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_example * weights).mean()
