"""Named choices for training: which layers get LoRA, and settings that fit a GPU's memory.

Pure data and functions (no torch): the spec validates against them and the plan records them.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
# kohya's LoCon targets: every conv (and the time-embedding linear) inside ResnetBlock2D,
# Downsample2D and Upsample2D, on top of the transformer blocks' linear layers.
RESNET_CONV = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION,
    "attention+ff": ATTENTION + FEED_FORWARD,
    "locon": ATTENTION + FEED_FORWARD + RESNET_CONV,
}
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def target_preset_of(target_modules: tuple[str, ...]) -> str | None:
    """The preset whose modules these are (in any order), or None for a list of one's own."""
    return next((name for name, modules in TARGET_PRESETS.items() if set(modules) == set(target_modules)), None)

Family = Literal["sd15", "sdxl"]
# Per family, tiers from the smallest GPU up:
# (at least GiB, resolution, batch size, gradient checkpointing, mixed precision, rank).
# Frozen weights are held in the mixed-precision dtype: ~2.2 GiB for SD1.5, ~7 GiB for SDXL.
MEMORY_TIERS: dict[str, tuple[tuple[float, int, int, bool, str, int], ...]] = {
    "sd15": (
        (4, 512, 1, True, "fp16", 8),
        (6, 512, 2, True, "fp16", 16),
        (10, 512, 4, True, "fp16", 32),
        (16, 512, 4, False, "fp16", 32),
        (24, 512, 8, False, "bf16", 64),
        (40, 512, 16, False, "bf16", 64),
    ),
    "sdxl": (
        (10, 1024, 1, True, "fp16", 8),
        (16, 1024, 1, True, "fp16", 16),
        (24, 1024, 2, True, "bf16", 32),
        (40, 1024, 4, False, "bf16", 32),
        (80, 1024, 8, False, "bf16", 64),
    ),
}
NATIVE_RESOLUTION = {"sd15": 512, "sdxl": 1024}


class MemoryPreset(BaseModel):
    """The settings chosen for a GPU size, and why, in words a person can check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gib: float
    family: Family
    resolution: int
    batch_size: int
    gradient_checkpointing: bool
    mixed_precision: Literal["fp16", "bf16"]
    rank: int
    explanation: str

    TRAINING_KEYS: ClassVar[tuple[str, ...]] = (
        "resolution", "batch_size", "ranks", "gradient_checkpointing", "mixed_precision")

    def training_fields(self) -> dict[str, object]:
        """The values as `[training]` keys (a spec key the user set wins over these; see tasks.sweep.plan)."""
        return {"resolution": self.resolution, "batch_size": self.batch_size, "ranks": (self.rank,),
                "gradient_checkpointing": self.gradient_checkpointing, "mixed_precision": self.mixed_precision}


def memory_preset(gib: float, family: Family = "sd15") -> MemoryPreset:
    """Resolution, batch size, gradient checkpointing, mixed precision and rank for `gib` GiB of GPU memory."""
    tiers = MEMORY_TIERS[family]
    if gib < tiers[0][0]:
        raise ValueError(f"{gib:g} GiB is below the smallest {family} preset ({tiers[0][0]:g} GiB); "
                         f"allowed: {tiers[0][0]:g} GiB or more")
    index = max(i for i, tier in enumerate(tiers) if gib >= tier[0])
    floor, resolution, batch, checkpointing, precision, rank = tiers[index]
    ceiling = f"{tiers[index + 1][0]:g}" if index + 1 < len(tiers) else "more"
    reasons = [
        f"{gib:g} GiB, {family}: the {floor:g} to {ceiling} GiB tier",
        f"resolution {resolution} ({family}'s native size)" if resolution == NATIVE_RESOLUTION[family]
        else f"resolution {resolution}",
        f"batch size {batch}",
        "gradient checkpointing on (recomputes activations in the backward pass: ~30% slower, far less memory)"
        if checkpointing else "gradient checkpointing off (the activations fit, so no recomputation)",
        f"{precision} mixed precision with frozen weights in {precision} (half the memory of fp32; "
        + ("runs on any CUDA GPU; set mixed_precision = 'bf16' on Ampere or newer)" if precision == "fp16"
           else "bf16 needs an Ampere or newer GPU; set mixed_precision = 'fp16' on older ones)"),
        f"rank {rank} (more capacity where memory allows)",
    ]
    return MemoryPreset(gib=gib, family=family, resolution=resolution, batch_size=batch,
                        gradient_checkpointing=checkpointing, mixed_precision=precision, rank=rank,
                        explanation="; ".join(reasons))


def network_problems(network: str, lokr_factor: int, lora_dropout: float) -> list[str]:
    """What the adapter type (training.network) cannot combine with: lokr_factor outside LoKr, LoRA dropout
    with LoHa/LoKr (peft's have no input dropout)."""
    problems = []
    if lokr_factor == 0 or (lokr_factor != -1 and network != "lokr"):
        problems.append(f"lokr_factor {lokr_factor} " + ("is not a factor" if lokr_factor == 0 else
                        f"only applies with network = 'lokr' (network is {network!r})")
                        + "; allowed: -1 (automatic) or a factor of 1 or more, with network = 'lokr'")
    if lora_dropout and network in ("loha", "lokr"):
        problems.append(f"lora_dropout {lora_dropout} does not apply to network {network!r}; "
                        "allowed: lora_dropout 0, or network 'lora' or 'dora'")
    return problems


# Last name part of the UNet's k x k convolutions (resnets' conv1/conv2, the down/upsamplers' conv, conv_in,
# conv_out): the layers kohya's and LyCORIS' conv_dim / conv_alpha apply to. A 1 x 1 convolution (conv_shortcut)
# takes the network's rank and alpha, as a linear layer does.
SPATIAL_CONVS = ("conv1", "conv2", "conv", "conv_in", "conv_out")


def conv_problems(conv_rank: int | None, conv_alpha: float | None, targets: tuple[str, ...]) -> list[str]:
    """conv_rank / conv_alpha (LoCon) with target modules that hold no k x k convolution: they would change nothing."""
    if (conv_rank is None and conv_alpha is None) or any(t.rsplit(".", 1)[-1] in SPATIAL_CONVS for t in targets):
        return []
    given = " and ".join(f"{name} {value}" for name, value in (("conv_rank", conv_rank), ("conv_alpha", conv_alpha))
                         if value is not None)
    return [(f"{given} only applies to convolution layers, and the target modules {list(targets)} have none; "
             f"allowed: target_preset = 'locon', or target_modules naming a k x k convolution "
             f"({', '.join(SPATIAL_CONVS)}), or leave conv_rank and conv_alpha out")]
