"""The files of one LoRA checkpoint folder, by name (no torch: the flow, render and run records read them).

Each checkpoint folder holds exactly `checkpoint_files(checkpoint_id)`: the diffusers/peft LoRA, the
kohya LoRA named by the checkpoint id, `checkpoint.json` and `training_state.pt` (tasks.lora.export).
"""

from __future__ import annotations

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
