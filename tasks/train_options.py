"""What the training options add around the loop in tasks.train: checks of what this machine can
run (before any work), the optimizer, offset noise, the Min-SNR loss, and the loop state that a
resumed run restores."""

from __future__ import annotations

import logging
from importlib.util import find_spec

import torch
import torch.nn.functional as F

from tasks.plan import TrainingRunSpec

log = logging.getLogger(__name__)


def log_memory_preset(run: TrainingRunSpec) -> None:
    """Log the memory preset's choice, and which of its values the spec's own keys replaced."""
    preset = run.memory_preset
    if preset is None:
        return
    log.info("run %s: memory preset: %s", run.run_id, preset.explanation)
    chosen = {"resolution": preset.resolution, "batch_size": preset.batch_size, "rank": preset.rank,
              "gradient_checkpointing": preset.gradient_checkpointing, "mixed_precision": preset.mixed_precision}
    overridden = {k: getattr(run, k) for k, v in chosen.items() if getattr(run, k) != v}
    if overridden:
        log.info("run %s: the spec's own values win over the preset: %s", run.run_id, overridden)


def check_training_support(run: TrainingRunSpec, device: str) -> None:
    """Options this machine cannot run, reported before any model is loaded or step taken."""
    problems = []
    if run.mixed_precision == "fp16" and device != "cuda":
        problems.append("training.mixed_precision = 'fp16' needs a CUDA GPU and this machine trains on the CPU; "
                        "allowed here: 'bf16' or 'no'")
    if run.optimizer == "adamw8bit":
        missing = [what for what, absent in (("a CUDA GPU", device != "cuda"),
                                             ("the bitsandbytes package", find_spec("bitsandbytes") is None)) if absent]
        if missing:
            problems.append(f"training.optimizer = 'adamw8bit' needs {' and '.join(missing)}, which this machine "
                            "lacks; allowed here: 'adamw'")
    if problems:
        raise ValueError(f"run {run.run_id} cannot train here: " + "; ".join(problems))


def make_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=1e-2)
    return torch.optim.AdamW(groups, weight_decay=1e-2)


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


def loop_state(optimizer, lr_schedule, scaler, generator: torch.Generator) -> dict:
    """Everything besides the LoRA weights that the next step depends on (dropout uses torch's global RNG)."""
    state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_schedule.state_dict(),
             "grad_scaler": scaler.state_dict(), "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_loop_state(state: dict, optimizer, lr_schedule, scaler, generator: torch.Generator) -> None:
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    # States saved before LR schedules existed were all constant-LR and dropout-free: nothing more to restore.
    if "lr_scheduler" in state:
        lr_schedule.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(state["torch_rng"])
    if scaler.is_enabled():
        scaler.load_state_dict(state["grad_scaler"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
