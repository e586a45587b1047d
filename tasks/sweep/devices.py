"""What accelerators this process sees, and how many CPU threads a task gets.

The flow imports this module and stays free of torch (about 2 s and 400 MB to import), so torch is
imported inside the two functions that ask it, only when they are called.
"""

from __future__ import annotations

import os


def torch_device() -> str:
    """Where training and rendering run: "cuda" when torch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_device_count() -> int:
    """CUDA devices visible here (respects CUDA_VISIBLE_DEVICES); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# The flow's thread runner runs two tasks at once (flows/lora_sweep.py); on a CPU-only machine each
# gets its share of the cores. Oversubscribed OpenMP pools (2 tasks x all cores each) made a demo
# training step 100x slower on 2 busy cores.
CONCURRENT_TASKS = 2


def cpu_threads_per_task() -> int:
    """torch threads for one task: OMP_NUM_THREADS when the user set it, else cores / concurrent tasks."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // CONCURRENT_TASKS)


def resolve_precision(precision: str, device: str) -> str:
    """The precision a job renders in on `device`: "auto" is fp16 on CUDA and fp32 on the CPU.

    fp16 on the CPU is refused (slow, and some CPU kernels lack it); bf16 runs on both.
    """
    if precision == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ValueError("render.precision = 'fp16' needs a CUDA GPU and this machine renders on the CPU; "
                         "allowed here: 'auto', 'fp32' or 'bf16'")
    return precision
