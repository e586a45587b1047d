"""Write one LoRA checkpoint folder atomically, in the diffusers/peft and kohya formats.

Each checkpoint folder holds exactly:
  pytorch_lora_weights.safetensors   diffusers/peft format (load_lora_weights)
  <checkpoint_id>.safetensors        kohya format for AUTOMATIC1111 / ComfyUI, with ss_* metadata
  checkpoint.json                    the resolved run spec, step and provenance
  training_state.pt                  optimizer, RNG and LoRA state to resume from (tensors only,
                                     loaded with torch.load(weights_only=True))
The folder is assembled under a temporary name and renamed into place, so a reader sees
either a complete checkpoint or none.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from tasks.plan import TrainingRunSpec
from tasks.provenance import provenance

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
MANIFEST_FILE = "checkpoint.json"
STATE_FILE = "training_state.pt"


def checkpoint_files(checkpoint_id: str) -> set[str]:
    """The exact set of files every checkpoint folder holds."""
    return {DIFFUSERS_FILE, f"{checkpoint_id}.safetensors", MANIFEST_FILE, STATE_FILE}


def checkpoint_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (MANIFEST_FILE, DIFFUSERS_FILE, STATE_FILE))


def load_training_state(folder: Path) -> dict:
    """The state saved beside a checkpoint; weights_only refuses anything but tensors and plain data."""
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


def save_checkpoint(run: TrainingRunSpec, unet, adapter: str, step: int, checkpoint_id: str, folder: Path,
                    *, training_state: dict) -> Path:
    """Save the adapter at `step` into `folder` (replacing any earlier partial attempt)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        peft_state = get_peft_model_state_dict(unet, adapter_name=adapter)
        metadata = unet.peft_config[adapter].to_dict()
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=convert_state_dict_to_diffusers(peft_state), safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )
        kohya = kohya_state_dict(peft_state, run.alpha)
        save_file(kohya, str(tmp / f"{checkpoint_id}.safetensors"), metadata=kohya_metadata(run, step))
        manifest = {"checkpoint_id": checkpoint_id, "step": step, "run": run.model_dump(mode="json"),
                    "provenance": provenance()}
        torch.save(training_state, tmp / STATE_FILE)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def kohya_state_dict(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """kohya keys (`lora_unet_*.lora_down/lora_up/alpha`) with the REAL alpha.

    diffusers' converter writes alpha = rank; a reloaded LoRA would then be scaled wrongly
    whenever alpha != rank, so every `.alpha` is overwritten.
    """
    prefixed = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in peft_state.items()}
    converted = convert_state_dict_to_kohya(prefixed)
    return {k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v) for k, v in converted.items()}


def kohya_metadata(run: TrainingRunSpec, step: int) -> dict[str, str]:
    """The `ss_*` fields A1111 and civitai read from a kohya LoRA (all values are strings)."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(run.rank),
        "ss_network_alpha": str(run.alpha),
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": run.base_model.name,
        "ss_resolution": f"({run.resolution}, {run.resolution})",
        "ss_steps": str(step),
        "ss_max_train_steps": str(run.max_steps),
        "ss_learning_rate": str(run.learning_rate),
        "ss_unet_lr": str(run.learning_rate),
        "ss_text_encoder_lr": "0",
        "ss_optimizer": "torch.optim.AdamW(weight_decay=0.01)",
        "ss_seed": str(run.seed),
        "ss_batch_size_per_device": str(run.batch_size),
        "ss_output_name": run.run_id,
        "ss_training_finished_at": str(datetime.now(timezone.utc).timestamp()),
        "ss_tag_frequency": json.dumps({run.dataset.trigger_word: {run.dataset.trigger_word: 1}}),
        "modelspec.title": run.run_id,
        "lora_sweep.run_id": run.run_id,
    }
