"""Full-size UNets with random weights for GPU throughput (speed does not depend on the weights),
toy versions of the same architectures for dry runs on CPU, FLOP counting and card peaks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel

# diffusers' UNet2DConditionModel defaults are SD1.5's, except the text width (1280 -> CLIP-L's 768).
SD15_CONFIG: dict[str, Any] = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
SDXL_CONFIG: dict[str, Any] = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
TOY_SD15_CONFIG: dict[str, Any] = {  # same block kinds as tasks.models.tiny_sd15, for --gpu-dry-run
    "sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
    "attention_head_dim": 4, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
TOY_SDXL_CONFIG: dict[str, Any] = {
    **SDXL_CONFIG, "sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2), "attention_head_dim": (2, 4), "cross_attention_dim": 64,
    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32,
}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TOKENS = 77

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets; first match wins.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)
# Published SD1.5 512 px, batch 1, 20+ steps with CFG on an H100 (it/s), for the comparison rows.
PUBLISHED_SD15_512_H100 = {"plain diffusers": 54.0, "stable-fast": 105.0}


@dataclass(frozen=True)
class UNetCase:
    """One architecture at one resolution: builds the model and its per-step inputs."""

    name: str
    config: dict[str, Any] = field(hash=False)
    resolution: int
    reference: bool = False  # the SD1.5 512 px case the published figures describe

    @property
    def label(self) -> str:
        return f"{self.name} {self.resolution}px"

    def build(self, device: str, dtype: torch.dtype) -> UNet2DConditionModel:
        """Random weights, initialised on the device (an SDXL UNet takes minutes to initialise on CPU)."""
        with torch.device(device):
            unet = UNet2DConditionModel(**self.config)
        return unet.to(dtype=dtype).eval().requires_grad_(False)

    def inputs(self, images: int, device: str, dtype: torch.dtype, *, cfg: bool = True) -> dict[str, Any]:
        """Keyword arguments of one UNet call for `images` images (x2 with classifier-free guidance)."""
        batch = images * (2 if cfg else 1)
        latent = self.resolution // 8
        args: dict[str, Any] = {
            "sample": torch.randn(batch, 4, latent, latent, device=device, dtype=dtype),
            "timestep": torch.full((batch,), 999, device=device, dtype=torch.long),
            "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, self.config.get("cross_attention_dim", 1280),
                                                 device=device, dtype=dtype),
        }
        if self.config.get("addition_embed_type") == "text_time":
            pooled = self.config["projection_class_embeddings_input_dim"] - 6 * self.config["addition_time_embed_dim"]
            args["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                "time_ids": torch.tensor([[self.resolution] * 2 + [0, 0] + [self.resolution] * 2] * batch,
                                         device=device, dtype=dtype),
            }
        return args


def gpu_cases(dry_run: bool) -> list[UNetCase]:
    """SD1.5- and SDXL-size UNets at 512 and 1024 px; for a dry run, one toy case of each architecture."""
    if dry_run:
        return [UNetCase("toy-sd15", TOY_SD15_CONFIG, 32, reference=True), UNetCase("toy-sdxl", TOY_SDXL_CONFIG, 64)]
    return [UNetCase("sd15", SD15_CONFIG, 512, reference=True), UNetCase("sd15", SD15_CONFIG, 1024),
            UNetCase("sdxl", SDXL_CONFIG, 512), UNetCase("sdxl", SDXL_CONFIG, 1024)]


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak from its name, or None for a card not in the table."""
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


def count_flops(fn, device: str) -> int:
    """FLOPs of one call of `fn`, counted per operator; on CPU through the math attention kernel,
    because FlopCounterMode has no formula for the CPU flash kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    kernels = sdpa_kernel(SDPBackend.MATH) if device == "cpu" else contextlib.nullcontext()
    with kernels, FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
