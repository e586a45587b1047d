"""The embedded tiny SDXL-architecture model, built in code from seeded configs (see tasks.models.tiny_sd15).

Same module names as SDXL: a UNet with `text_time` added conditioning (pooled text + six size
ids), two CLIP text encoders (the second with a projection, whose pooled output conditions the
UNet), a real x8 VAE and SDXL's Euler scheduler. Random weights: images are deterministic noise,
and every code path (LoRA training, saving, reloading, samplers) behaves as on SDXL.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tasks.models.tiny_sd15 import (
    MARKER,
    TEXT_CONFIG,
    TOKENIZER_DIR,
    UNET_CONFIG,
    VAE_CONFIG,
    TinyBuild,
    core_components,
    seeded_models,
)

SDXL_BUILDER_VERSION = 1
SDXL_BUILD_ENTRIES = {"model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                      "scheduler", MARKER}
TEXT_HIDDEN = TEXT_CONFIG["hidden_size"]
TIME_EMBED_DIM = 8
SDXL_UNET_CONFIG = {  # the SD1.5 tiny UNet's sizes, with SDXL's block order and conditioning
    **UNET_CONFIG,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL order: plain first, attention deeper
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 2 * TEXT_HIDDEN,  # both encoders' hidden states, concatenated
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + TEXT_HIDDEN,  # six size ids + pooled text
}
SDXL_VAE_CONFIG = {**VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_SCHEDULER_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}  # (its clip_sample, sample_max_value, set_alpha_to_one and skip_prk_steps are not Euler arguments)


def tiny_sdxl_components(seed: int) -> dict[str, object]:
    """Instantiate the SDXL pipeline components, each model from its own seed."""
    unet, vae, text_encoder, text_encoder_2 = seeded_models(
        seed, lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG), lambda: AutoencoderKL(**SDXL_VAE_CONFIG),
        lambda: CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
        lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_CONFIG, projection_dim=TEXT_HIDDEN)))
    return {**core_components(unet, vae, text_encoder), "text_encoder_2": text_encoder_2,
            "tokenizer_2": CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)),
            "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG), "image_encoder": None,
            "feature_extractor": None, "add_watermarker": False}


TINY_SDXL = TinyBuild("tasks.models.tiny_sdxl", SDXL_BUILDER_VERSION, StableDiffusionXLPipeline, tiny_sdxl_components,
                      frozenset(SDXL_BUILD_ENTRIES))


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    return TINY_SDXL.build(folder, seed)


def ensure_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """The seeded tiny SDXL model in `folder`, built there first (atomically) unless it holds this build."""
    return TINY_SDXL.ensure(folder, seed)
