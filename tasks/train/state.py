"""The optimizer and the loop state a resumed run restores (optimizer, LR schedule, grad scaler, RNGs)."""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.lora.files import STATE_FILE


def make_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (weight decay 0.01), or bitsandbytes' 8-bit AdamW with the same settings."""
    if name == "adamw8bit":
        # Optional and CUDA-only (checked before any work, tasks.train.support): imported only when chosen.
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=1e-2)
    return torch.optim.AdamW(groups, weight_decay=1e-2)


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


def load_training_state(folder: Path) -> dict:
    """The state saved beside a checkpoint; weights_only refuses anything but tensors and plain data."""
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
