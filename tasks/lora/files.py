"""The files of one LoRA checkpoint folder, by name (no torch: the flow, render and run records read them).

Each checkpoint folder holds exactly `checkpoint_files(checkpoint_id)`: the diffusers/peft LoRA, the
kohya LoRA named by the checkpoint id, `checkpoint.json` and `training_state.pt` (tasks.lora.export).
A folder being assembled is named `.step-XXXXXX.<random>` beside it until it is renamed into place.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
MANIFEST_FILE = "checkpoint.json"
STATE_FILE = "training_state.pt"


def checkpoint_files(checkpoint_id: str) -> set[str]:
    """The exact set of files every checkpoint folder holds."""
    return {DIFFUSERS_FILE, f"{checkpoint_id}.safetensors", MANIFEST_FILE, STATE_FILE}


def checkpoint_complete(folder: Path) -> bool:
    """A checkpoint folder is complete when its manifest, LoRA and training state are all there."""
    return all((folder / name).is_file() for name in (MANIFEST_FILE, DIFFUSERS_FILE, STATE_FILE))


PARTIAL_CHECKPOINT = re.compile(r"^\.step-\d+\.[a-z0-9_]{8}$")  # tempfile.mkdtemp's 8 random characters


def partial_prefix(folder: Path) -> str:
    """The start of the name a checkpoint folder is assembled under (tasks.lora.export)."""
    return f".{folder.name}."


def remove_partial_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Remove checkpoint folders a killed trainer left half-assembled. Call only while holding the run's
    claim (tasks.train.claim): then no other trainer of the run can be assembling one."""
    if not checkpoints_dir.is_dir():
        return []
    partial = [p for p in checkpoints_dir.iterdir() if PARTIAL_CHECKPOINT.match(p.name) and p.is_dir()]
    for folder in partial:
        shutil.rmtree(folder, ignore_errors=True)
    return partial
