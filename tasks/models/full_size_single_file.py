"""A full-size diffusers folder as one original-layout `.safetensors`, as civitai ships SD1.5 and SDXL.

SD1.x: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`.
SDXL (Stability's sgm layout): the same UNet and VAE names (the UNet's added conditioning as
`label_emb.0.*`), the first text encoder under `conditioner.embedders.0.transformer.text_model.*` and
the second in OpenCLIP's layout under `conditioner.embedders.1.model.*` (q, k, v fused into one
`in_proj_weight`, the projection stored transposed). The renames are tasks.models.single_file's and
diffusers' own single-file converters (DIFFUSERS_TO_LDM_MAPPING) in reverse.

The file is written tensor by tensor: safetensors' `save`/`save_file` first copy every tensor into one
bytes object, which for the SDXL UNet would double 5 GB. The format is a little-endian u64 header
length, a JSON header of names, dtypes, shapes and byte offsets, then the bytes.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors import safe_open

from tasks.models.single_file import load_component, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
LOADERS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}
ADDED_CONDITIONING = DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]  # add_embedding.* -> label_emb.0.*
SD15_TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
OPEN_CLIP_LAYER_RENAMES = (  # within one encoder layer: diffusers -> OpenCLIP
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
OPEN_CLIP_FIXED = {  # outside the layers: diffusers -> OpenCLIP
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}

Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]  # name, dtype, shape, loader


def unet_entries(folder: Path, config: dict) -> list[Entry]:
    """The UNet's tensors under their original names, each read from its shard only when written."""
    entries = []
    for file in sorted((folder / "unet").glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                view = handle.get_slice(key)
                shape, dtype = tuple(view.get_shape()), LOADERS[view.get_dtype()]
                if key in ADDED_CONDITIONING:
                    name = f"model.diffusion_model.{ADDED_CONDITIONING[key]}"
                else:
                    [name] = unet_to_ldm({key: torch.empty(shape, dtype=dtype, device="meta")}, config)
                entries.append((name, dtype, shape, tensor_loader(file, key)))
    return entries


def tensor_loader(file: Path, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(key)
    return load


def open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection weights -> OpenCLIP's names under `conditioner.embedders.1.model.`;
    a weight with no OpenCLIP name is an error, never dropped."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {OPEN_CLIP_PREFIX + "text_projection": state.pop("text_projection.weight").T.contiguous()}
    out |= {OPEN_CLIP_PREFIX + ldm: state.pop(key) for key, ldm in OPEN_CLIP_FIXED.items()}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        ours, theirs = f"encoder.layers.{i}.", f"{OPEN_CLIP_PREFIX}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            fused = [state.pop(f"{ours}self_attn.{p}_proj.{part}") for p in "qkv"]
            out[f"{theirs}attn.in_proj_{part}"] = torch.cat(fused)
        for old, new in OPEN_CLIP_LAYER_RENAMES:
            for part in ("weight", "bias"):
                out[f"{theirs}{new}{part}"] = state.pop(f"{ours}{old}{part}")
    if state:
        raise KeyError(f"text encoder 2 weights with no OpenCLIP name: {sorted(state)[:5]}")
    return out


def in_memory_entries(state: dict[str, torch.Tensor]) -> list[Entry]:
    return [(k, v.dtype, tuple(v.shape), (lambda v=v: v)) for k, v in state.items()]


def original_entries(folder: Path, configs: dict[str, dict]) -> list[Entry]:
    """Every tensor of the folder's components under its original single-file name."""
    vae, _ = load_component(folder, "vae")
    text, _ = load_component(folder, "text_encoder")
    if "text_encoder_2" in configs:  # SDXL
        text_state = {SDXL_TEXT_PREFIX + k.removeprefix(SD15_TEXT_PREFIX): v
                      for k, v in text_encoder_to_ldm(text).items()}
        text_state |= open_clip_state(load_component(folder, "text_encoder_2")[0])
    else:
        text_state = text_encoder_to_ldm(text)
    entries = unet_entries(folder, configs["unet"])
    entries += in_memory_entries({**vae_to_ldm(vae, configs["vae"]), **text_state})
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("two weights map to one original name; the conversion is wrong")
    return entries


def write_original_checkpoint(folder: Path, out_file: Path, configs: dict[str, dict]) -> Path:
    """Write the diffusers `folder` as one original-layout file at `out_file` (temporary name, then renamed)."""
    tmp = out_file.parent / f".{out_file.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_streamed(tmp, original_entries(Path(folder), configs), {"format": "pt"})
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


def write_streamed(path: Path, entries: list[Entry], metadata: dict[str, str]) -> None:
    """A safetensors file written one tensor at a time (peak memory: the largest tensor, not the file)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, _ in entries:
        size = torch.empty(shape, dtype=dtype, device="meta").nelement() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, dtype, shape, load in entries:
            tensor = load().contiguous()
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(f"{name}: expected {dtype} {shape}, read {tensor.dtype} {tuple(tensor.shape)}")
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
