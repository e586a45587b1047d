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
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
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


def core_components(unet, vae, text_encoder) -> dict[str, object]:
    """The components every tiny pipeline shares: the models and the real CLIP tokenizer."""
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))}


def tiny_components(seed: int) -> dict[str, object]:
    """Instantiate the pipeline components; each model gets its own seed so they are independent."""
    unet, vae, text_encoder = seeded_models(seed, lambda: UNet2DConditionModel(**UNET_CONFIG),
                                            lambda: AutoencoderKL(**VAE_CONFIG),
                                            lambda: CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)))
    return {**core_components(unet, vae, text_encoder), "scheduler": PNDMScheduler(**SCHEDULER_CONFIG),
            "safety_checker": None, "feature_extractor": None, "image_encoder": None,
            "requires_safety_checker": False}


@dataclass(frozen=True)
class TinyBuild:
    """A builtin model built in code: its builder name and version (recorded in the folder's marker),
    pipeline class, seeded components and the entries its folder may hold."""

    builder: str
    version: int
    pipeline_class: type
    components: Callable[[int], dict[str, object]]
    entries: frozenset[str]

    def build(self, folder: Path, seed: int = 0) -> Path:
        """Build the seeded model and save it as an ordinary diffusers folder (safetensors)."""
        pipe = self.pipeline_class(**self.components(seed))
        return save_built(pipe, Path(folder), self.builder, self.version, seed)

    def ensure(self, folder: Path, seed: int = 0) -> Path:
        """Return `folder`, building it first if absent, unfinished or from another seed/builder version.

        The build goes into a temporary sibling that is renamed into place, so readers never see a
        half-written model and concurrent callers cannot corrupt each other.
        """
        return materialise(Path(folder), lambda f: is_current_build(f, seed, self.builder, self.version),
                           lambda tmp: self.build(tmp, seed), set(self.entries))


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
    """The seeded tiny SD1.5 model in `folder`, built there first unless it holds this build."""
    return TINY_SD15.ensure(folder, seed)


def build_tiny_sd15(folder: Path, seed: int = 0) -> Path:
    return TINY_SD15.build(folder, seed)


TINY_SD15 = TinyBuild("tasks.models.tiny_sd15", BUILDER_VERSION, StableDiffusionPipeline, tiny_components,
                      frozenset(BUILD_ENTRIES))


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
