"""A base model's family, "sd15" (SD1.x) or "sdxl", read from model_index.json without torch.

The plan (tasks.sweep.plan, imported by the flow, which stays free of torch) needs it to pick each base
model's memory preset; tasks.models.base_model needs it to pick the pipeline class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

ModelFamily = Literal["sd15", "sdxl"]
PIPELINE_CLASSES: dict[str, ModelFamily] = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


def index_family(folder: Path) -> tuple[ModelFamily, str | None]:
    """The family a diffusers folder's model_index.json names, and the problem if it names none we load."""
    try:
        name = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        return "sd15", f"model_index.json is unreadable ({error}); expected diffusers' JSON with _class_name"
    if name not in PIPELINE_CLASSES:
        return "sd15", (f"model_index.json names pipeline {name!r}; allowed: "
                        f"{', '.join(repr(k) for k in PIPELINE_CLASSES)} (SD1.x or SDXL)")
    return PIPELINE_CLASSES[name], None


def model_family(path: str, config: str | None = None) -> ModelFamily:
    """'sd15' or 'sdxl' for a base model: from its model_index.json, or its `config=` folder's for a single file."""
    base = Path(path)
    folder = base if base.is_dir() else Path(config) if config is not None else None
    if folder is None or not (folder / "model_index.json").is_file():
        return "sd15"  # a single file without config= fails validation; SD1.x until told otherwise
    return index_family(folder)[0]
