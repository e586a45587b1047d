"""What accelerators this process sees (torch is imported only when asked)."""

from __future__ import annotations


def cuda_device_count() -> int:
    """CUDA devices visible here (respects CUDA_VISIBLE_DEVICES); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
