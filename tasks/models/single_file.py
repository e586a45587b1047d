"""Convert a diffusers SD1.x folder to the original single-file layout (LDM keys, as civitai ships
checkpoints), and write the weightless config folder that offline `from_single_file` needs.

Used to exercise the single-file loading path on the tiny models; the key renames mirror diffusers'
own single-file converters in reverse (DIFFUSERS_TO_LDM_MAPPING).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import load_file, save

from storage.atomic import write_atomic
from tasks.models.tiny_sd15 import MARKER, WEIGHT_SUFFIXES

UNET_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
VAE_ATTENTION_RENAMES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def unet_prefix_map(config: dict) -> dict[str, str]:
    """Diffusers UNet block prefixes -> LDM `input_blocks`/`middle_block`/`output_blocks` prefixes."""
    per_down, per_up = config["layers_per_block"], config["layers_per_block"] + 1
    n_blocks = len(config["down_block_types"])
    prefixes = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.1.": "middle_block.2."}
    for i in range(n_blocks):
        for j in range(per_down):
            ldm = i * (per_down + 1) + j + 1
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{ldm}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{ldm}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per_down + 1)}.0.op."
        for j in range(per_up):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * per_up + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * per_up + j}.1."
        slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
        prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * per_up + per_up - 1}.{slot}."
    return prefixes


def rename_by_prefix(key: str, prefixes: dict[str, str], renames: tuple[tuple[str, str], ...]) -> str | None:
    """Swap the longest matching prefix; apply `renames` to the rest of a resnet key. None if no prefix fits."""
    matches = [p for p in prefixes if key.startswith(p)]
    if not matches:
        return None
    prefix = max(matches, key=len)
    rest = key[len(prefix):]
    if ".resnets." in prefix:
        for old, new in renames:
            rest = new + rest[len(old):] if rest.startswith(old) else rest
    return prefixes[prefix] + rest


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers UNet weights -> `model.diffusion_model.*` keys; an unmapped key is an error, never dropped."""
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    prefixes = unet_prefix_map(config)
    out = {}
    for key, tensor in state_dict.items():
        ldm = fixed.get(key) or rename_by_prefix(key, prefixes, UNET_RESNET_RENAMES)
        if ldm is None:
            raise KeyError(f"UNet weight {key!r} has no original-SD name (unsupported UNet layout)")
        out[f"model.diffusion_model.{ldm}"] = tensor
    return out


def vae_prefix_map(config: dict) -> dict[str, str]:
    """Diffusers VAE block prefixes -> LDM `encoder.down.i`/`decoder.up.i`/`mid` prefixes."""
    n = len(config["block_out_channels"])
    prefixes = {}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        for k in range(2):
            prefixes[f"{part}.mid_block.resnets.{k}."] = f"{part}.mid.block_{k + 1}."
    for i in range(n):
        for j in range(config["layers_per_block"] + 1):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    return prefixes


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers VAE weights -> `first_stage_model.*`; mid-attention linears become 1x1 convs as in LDM."""
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    prefixes = vae_prefix_map(config)
    out = {}
    for key, tensor in state_dict.items():
        ldm = fixed.get(key) or rename_by_prefix(key, prefixes, (("conv_shortcut.", "nin_shortcut."),))
        if ldm is None:
            raise KeyError(f"VAE weight {key!r} has no original-SD name (unsupported VAE layout)")
        if ".mid.attn_1." in ldm:
            head, _, tail = ldm.rpartition(".mid.attn_1.")
            for old, new in VAE_ATTENTION_RENAMES:
                tail = new + tail[len(old):] if tail.startswith(old) else tail
            ldm = f"{head}.mid.attn_1.{tail}"
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        out[f"first_stage_model.{ldm}"] = tensor
    return out


def text_encoder_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text weights -> `cond_stage_model.transformer.text_model.*`.

    transformers 5 flattened CLIPTextModel (no `text_model.` prefix); single-file loading looks
    for the prefixed keys, so it is put back.
    """
    prefix = "cond_stage_model.transformer."
    return {
        prefix + (key if key.startswith("text_model.") else f"text_model.{key}"): tensor
        for key, tensor in state_dict.items()
    }


def load_component(diffusers_folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """One component's weights (all its safetensors shards) and its config."""
    folder = Path(diffusers_folder) / name
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        state_dict.update(load_file(file))
    return state_dict, json.loads((folder / "config.json").read_text(encoding="utf-8"))


def write_single_file_checkpoint(diffusers_folder: Path, out_file: Path) -> Path:
    """Write the folder's UNet, VAE and text encoder as one original-SD `.safetensors`, as civitai ships them."""
    unet, unet_config = load_component(diffusers_folder, "unet")
    vae, vae_config = load_component(diffusers_folder, "vae")
    text, _ = load_component(diffusers_folder, "text_encoder")
    state_dict = {**unet_to_ldm(unet, unet_config), **vae_to_ldm(vae, vae_config), **text_encoder_to_ldm(text)}
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out_file, save(state_dict, metadata={"format": "pt"}))


def write_config_folder(diffusers_folder: Path, out_folder: Path) -> Path:
    """Copy the folder without its weights (or build marker): the `config=` offline `from_single_file` needs."""
    def skip_weights(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if Path(n).suffix in WEIGHT_SUFFIXES or n == MARKER}

    shutil.copytree(diffusers_folder, out_folder, ignore=skip_weights, dirs_exist_ok=True)
    return Path(out_folder)
