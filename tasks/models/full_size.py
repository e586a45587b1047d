"""Full-size SD1.5 and SDXL base models with seeded random weights, built on demand from the public configs.

No weights can be downloaded here, but every shape and name of the real models can be built: the
config files of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0 are
committed under tasks/assets/full_size (no weights; the CLIP vocabulary is tasks/assets/clip_tokenizer),
and each weight component is instantiated from its config with its own seed and saved in fp16 (half
the disk, and random weights lose nothing by it). Built into a cache folder (`LORA_SWEEP_FULL_SIZE_CACHE`,
default ~/.cache/lora-sweep/full-size) so `make test-slow` builds them once:

  <cache>/sd15/, <cache>/sdxl/        diffusers folders, laid out as the public repos are
  <cache>/<family>-seed0-v1.safetensors   the same weights as one original-layout file (civitai's layout,
                                      tasks.models.full_size_single_file)
  <cache>/<family>-config/            the weightless config folder `from_single_file(config=...)` needs

`python -m tasks.models.full_size sd15|sdxl` builds one and prints the paths and sizes.
Memory: one component at a time, built in fp32 then halved (the SDXL UNet peaks near 10.3 GB).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

from tasks.assets import ASSETS_DIR, CLIP_TOKENIZER_DIR
from tasks.models.full_size_single_file import write_original_checkpoint
from tasks.models.memory import BUILDERS
from tasks.models.tiny_sd15 import folder_size, materialise, seeded_models

FULL_SIZE_ASSETS = ASSETS_DIR / "full_size"
CACHE_ENV = "LORA_SWEEP_FULL_SIZE_CACHE"
BUILDER = "tasks.models.full_size"
BUILDER_VERSION = 1
MARKER = "full_size_model.json"  # written last: a folder without it is an unfinished build
STORED_DTYPE = torch.float16
MAX_SHARD = "2GB"  # the SDXL UNet in three files: saving holds one shard's bytes at a time, not 5 GB
VOCABULARY = ("vocab.json", "merges.txt")  # the CLIP BPE files every SD tokenizer folder holds


@dataclass(frozen=True)
class Family:
    """A full-size model family: its weight components in build order (component i gets seed + i) and tokenizers."""

    name: str
    components: tuple[str, ...]
    tokenizers: tuple[str, ...]

    @property
    def assets(self) -> Path:
        return FULL_SIZE_ASSETS / self.name

    @property
    def entries(self) -> frozenset[str]:
        """Everything a built folder holds."""
        return frozenset({"model_index.json", "scheduler", MARKER, *self.components, *self.tokenizers})


FAMILIES = {
    "sd15": Family("sd15", ("unet", "vae", "text_encoder"), ("tokenizer",)),
    "sdxl": Family("sdxl", ("unet", "vae", "text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")),
}


def cache_dir() -> Path:
    """Where the full-size models are built: $LORA_SWEEP_FULL_SIZE_CACHE, else ~/.cache/lora-sweep/full-size."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lora-sweep" / "full-size")


def family_of(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"full-size model {name!r}: unknown; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def component_config(family: Family, component: str) -> dict:
    return json.loads((family.assets / component / "config.json").read_text(encoding="utf-8"))


def write_configs(family: Family, folder: Path) -> Path:
    """The public repo's files without weights: model_index, scheduler, component configs, tokenizers."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(family.assets / "model_index.json", folder / "model_index.json")
    shutil.copytree(family.assets / "scheduler", folder / "scheduler", dirs_exist_ok=True)
    for component in family.components:
        (folder / component).mkdir(exist_ok=True)
        shutil.copy2(family.assets / component / "config.json", folder / component / "config.json")
    for tokenizer in family.tokenizers:
        shutil.copytree(family.assets / tokenizer, folder / tokenizer, dirs_exist_ok=True)
        for name in VOCABULARY:
            shutil.copy2(CLIP_TOKENIZER_DIR / name, folder / tokenizer / name)
    return folder


def save_component(family: Family, component: str, seed: int, folder: Path) -> None:
    """Instantiate one component from its public config with its seed, halve it and save its weights."""
    config = component_config(family, component)
    [model] = seeded_models(seed, lambda: BUILDERS[component](config))
    model.to(STORED_DTYPE)
    model.save_pretrained(folder / component, max_shard_size=MAX_SHARD)
    del model
    gc.collect()
    # The library wrote its own config.json; the folder keeps the public one, as the real repo has it.
    shutil.copy2(family.assets / component / "config.json", folder / component / "config.json")


def build_full_size(name: str, folder: Path, seed: int = 0) -> Path:
    """Build the family's diffusers folder in `folder`: public configs, seeded fp16 weights, marker last."""
    family = family_of(name)
    write_configs(family, folder)
    for offset, component in enumerate(family.components):
        save_component(family, component, seed + offset, folder)
    marker = {"builder": BUILDER, "builder_version": BUILDER_VERSION, "family": name, "seed": seed,
              "stored_dtype": str(STORED_DTYPE).removeprefix("torch."),
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}  # provenance only
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return folder


def is_current(folder: Path, name: str, seed: int) -> bool:
    marker = read_marker_file(folder)
    return (marker is not None and marker.get("builder") == BUILDER and marker.get("family") == name
            and marker.get("builder_version") == BUILDER_VERSION and marker.get("seed") == seed)


def read_marker_file(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def ensure_full_size(name: str, seed: int = 0, cache: Path | None = None) -> Path:
    """The family's full-size diffusers folder in the cache, built there first (atomically) unless current."""
    family = family_of(name)
    folder = (cache or cache_dir()) / name
    return materialise(folder, lambda f: is_current(f, name, seed), lambda tmp: build_full_size(name, tmp, seed),
                       set(family.entries))


def ensure_single_file(name: str, seed: int = 0, cache: Path | None = None) -> tuple[Path, Path]:
    """(single .safetensors in the original layout, its config folder), each built first unless present."""
    family = family_of(name)
    root = cache or cache_dir()
    folder = ensure_full_size(name, seed, root)
    file = root / f"{name}-seed{seed}-v{BUILDER_VERSION}.safetensors"
    if not file.is_file():  # written under a temporary name and renamed: present means complete
        write_original_checkpoint(folder, file, {c: component_config(family, c) for c in family.components})
    config = root / f"{name}-config"
    config_marker = {"builder": BUILDER, "family": name, "config_of": folder.name}

    def write_config(tmp: Path) -> None:
        write_configs(family, tmp)
        (tmp / MARKER).write_text(json.dumps(config_marker, indent=2) + "\n", encoding="utf-8")

    materialise(config, lambda f: read_marker_file(f) == config_marker, write_config,
                {"model_index.json", "scheduler", MARKER, *family.components, *family.tokenizers})
    return file, config


def main(argv: list[str]) -> int:
    """`python -m tasks.models.full_size sd15|sdxl [SEED]`: build (if needed) and print the paths and sizes."""
    if len(argv) not in (1, 2) or argv[0] not in FAMILIES:
        print(f"usage: python -m tasks.models.full_size {'|'.join(FAMILIES)} [SEED]", file=sys.stderr)
        return 2
    seed = int(argv[1]) if len(argv) == 2 else 0
    folder = ensure_full_size(argv[0], seed)
    file, config = ensure_single_file(argv[0], seed)
    print(f"{folder}  {folder_size(folder) / 1e9:.2f} GB\n{file}  {file.stat().st_size / 1e9:.2f} GB\n{config}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
