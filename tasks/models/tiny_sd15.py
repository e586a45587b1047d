"""The embedded tiny Stable Diffusion 1.5-architecture model, built in code from seeded configs.

Tests and examples need a real SD1.5-shaped pipeline (same module names, a real x8 VAE, the real
CLIP tokenizer) without downloading weights. The weights are random: images are noise, but
deterministic, and every code path (LoRA, single-file loading, samplers) behaves as on SD1.5.
`ensure_world_model` materialises the same architecture pretrained on the demo world
(`tasks.models.pretrain_tiny`, committed under assets/tiny-sd15-world), whose images show what captions say.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tasks.assets import CLIP_TOKENIZER_DIR, WORLD_MODEL_DIR

BUILDER_VERSION = 1
MARKER = "tiny_model.json"  # written last: a folder without it is an unfinished build
TOKENIZER_DIR = CLIP_TOKENIZER_DIR
BUILD_ENTRIES = {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", MARKER}
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth"}
# The tiny model pretrained on the demo world by `python -m tasks.models.pretrain_tiny` (fp16, committed).
WORLD_RECORD = "pretrain.json"
WORLD_ENTRIES = BUILD_ENTRIES | {WORLD_RECORD}

UNET_CONFIG = {
    "sample_size": 8,  # 64 px images / 8
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),  # SD1.5 order: attention first, plain last
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}
VAE_CONFIG = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 16, 32, 32),  # four levels: three downsamplers, a real x8
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "scaling_factor": 0.18215,
}
TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
SCHEDULER_CONFIG = {  # Stable Diffusion 1.5's scheduler/scheduler_config.json
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}


def seeded_models(seed: int, *builders: Callable[[], torch.nn.Module]) -> list[torch.nn.Module]:
    """Build each model from its own seed (seed, seed + 1, ...), leaving the caller's global RNG untouched."""
    models = []
    with torch.random.fork_rng(devices=[]):
        for offset, build in enumerate(builders):
            torch.manual_seed(seed + offset)
            models.append(build())
    return models


def tiny_components(seed: int) -> dict[str, object]:
    """Instantiate the pipeline components; each model gets its own seed so they are independent."""
    unet, vae, text_encoder = seeded_models(seed, lambda: UNet2DConditionModel(**UNET_CONFIG),
                                            lambda: AutoencoderKL(**VAE_CONFIG),
                                            lambda: CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)),
        "scheduler": PNDMScheduler(**SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def build_tiny_sd15(folder: Path, seed: int = 0) -> Path:
    """Build the seeded tiny model and save it as an ordinary diffusers folder (safetensors)."""
    return save_built(StableDiffusionPipeline(**tiny_components(seed)), Path(folder), "tasks.models.tiny_sd15",
                      BUILDER_VERSION, seed)


def save_built(pipe, folder: Path, builder: str, version: int, seed: int) -> Path:
    """Save a pipeline built in code as a diffusers folder, then its build record (written last)."""
    pipe.save_pretrained(folder, safe_serialization=True)
    marker = {
        "builder": builder,
        "builder_version": version,
        "seed": seed,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},  # provenance only
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return folder


def read_marker(folder: Path) -> dict[str, object] | None:
    """The folder's build record, or None when the build never finished."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_current_build(folder: Path, seed: int, builder: str = "tasks.models.tiny_sd15",
                     version: int = BUILDER_VERSION) -> bool:
    """True when the folder holds a finished build of this builder, builder version and seed."""
    marker = read_marker(folder)
    return (marker is not None and marker.get("builder") == builder and marker.get("builder_version") == version
            and marker.get("seed") == seed)


def ensure_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Return `folder`, building it first if absent, unfinished or from another seed/builder version.

    The build goes into a temporary sibling that is renamed into place, so readers never see a
    half-written model and concurrent callers cannot corrupt each other.
    """
    return materialise(Path(folder), lambda f: is_current_build(f, seed), lambda tmp: build_tiny_sd15(tmp, seed),
                       BUILD_ENTRIES)


def world_fingerprint(source: Path = WORLD_MODEL_DIR) -> str:
    """sha256 over the committed pretrained folder's and the tokenizer asset's file names and bytes
    (a changed file changes it)."""
    files = sorted(p for p in Path(source).rglob("*") if p.is_file())
    if not any(p.suffix == ".safetensors" for p in files) or not (Path(source) / WORLD_RECORD).is_file():
        raise FileNotFoundError(
            f"pretrained world model {source}: missing weights or {WORLD_RECORD}; rebuild it with "
            f"`python -m tasks.models.pretrain_tiny --out {source}`"
        )
    digest = hashlib.sha256()
    named = [(p.relative_to(source).as_posix(), p) for p in files]
    named += [(f"clip_tokenizer/{p.name}", p) for p in sorted(TOKENIZER_DIR.iterdir())]  # copied in as tokenizer/
    for name, path in named:
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_world_model(folder: Path, source: Path = WORLD_MODEL_DIR) -> Path:
    """Return `folder` holding a copy of the pretrained demo-world model, copying it first if needed.

    Atomic like ensure_tiny_model: copied into a temporary sibling, marker written last, renamed
    into place. A copy whose marker names another fingerprint (the committed weights changed) is replaced.
    """
    fingerprint = world_fingerprint(source)

    def is_current(f: Path) -> bool:
        marker = read_marker(f)
        return marker is not None and marker.get("fingerprint") == fingerprint

    def copy(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        # The tokenizer is the committed CLIP asset every tiny model uses, saved as the tiny builder saves it.
        CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(str(tmp / "tokenizer"))
        marker = {"builder": "tasks.models.tiny_sd15.ensure_world_model", "source": WORLD_MODEL_DIR.name,
                  "fingerprint": fingerprint}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

    return materialise(Path(folder), is_current, copy, WORLD_ENTRIES)


def materialise(folder: Path, is_done: Callable[[Path], bool], write: Callable[[Path], object],
                allowed: set[str]) -> Path:
    """Unless `is_done(folder)`, run `write` into a temporary sibling and rename it onto `folder`."""
    if is_done(folder):
        return folder
    refuse_foreign_folder(folder, allowed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would make the model private to this user
    try:
        write(tmp)
        swap_into_place(tmp, folder, is_done)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def refuse_foreign_folder(folder: Path, allowed: set[str] = BUILD_ENTRIES) -> None:
    """Raise rather than replace a folder holding anything a build would not have written."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"tiny model path {folder}: exists and is not a folder; expected a folder or nothing")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    if foreign:
        raise ValueError(
            f"tiny model path {folder}: holds {foreign}, which a tiny-model build never writes; "
            "refusing to replace it (expected an empty folder, an earlier tiny-model build, or nothing)"
        )


def swap_into_place(built: Path, folder: Path, is_done: Callable[[Path], bool]) -> None:
    """Rename the finished build onto `folder`, moving any stale build aside first."""
    if folder.exists():
        if is_done(folder):  # another process finished first
            return
        stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
        try:
            os.replace(folder, stale / folder.name)
        except FileNotFoundError:  # another process moved it aside already
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(built, folder)
    except OSError:
        if not is_done(folder):  # lost a race only if the winner is a good build
            raise


def folder_size(folder: Path) -> int:
    """Total bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ---- original Stable Diffusion (LDM / civitai) single-file format ----------------------------

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
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    save_file(state_dict, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_file)
    return out_file


def write_config_folder(diffusers_folder: Path, out_folder: Path) -> Path:
    """Copy the folder without its weights (or build marker): the `config=` offline `from_single_file` needs."""
    def skip_weights(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if Path(n).suffix in WEIGHT_SUFFIXES or n == MARKER}

    shutil.copytree(diffusers_folder, out_folder, ignore=skip_weights, dirs_exist_ok=True)
    return Path(out_folder)


def main(argv: list[str]) -> int:
    """`python -m tasks.models.tiny_sd15 FOLDER [SEED]`: build (if needed) and print the path and size."""
    if len(argv) not in (1, 2):
        print("usage: python -m tasks.models.tiny_sd15 FOLDER [SEED]", file=sys.stderr)
        return 2
    folder = ensure_tiny_model(Path(argv[0]), int(argv[1]) if len(argv) == 2 else 0)
    print(f"{folder.resolve()}  {folder_size(folder) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
