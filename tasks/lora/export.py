"""Write one LoRA checkpoint folder atomically, in the diffusers/peft and kohya formats.

Each checkpoint folder holds exactly:
  pytorch_lora_weights.safetensors   diffusers/peft format (load_lora_weights); UNet and, when
                                     trained, text-encoder LoRA (SDXL: both text encoders). LoHa, LoKr
                                     and DoRA per input column are written the same way, in peft's
                                     names, which diffusers cannot load (tasks.lora.networks renders
                                     them through peft)
  <checkpoint_id>.safetensors        kohya format for AUTOMATIC1111 / ComfyUI, with ss_* metadata
                                     and sshs_* hashes (tasks.lora.kohya_metadata)
  checkpoint.json                    the resolved run spec (every training option, the memory
                                     preset's choice), step, attention processor and provenance
  training_state.pt                  optimizer, RNG and LoRA state to resume from (tensors only,
                                     loaded with torch.load(weights_only=True))
The folder is assembled under a temporary name (`.step-XXXXXX.<random>`) and renamed into place, so
a reader sees either a complete checkpoint or none; a full disk or a refused write raises
storage.disk.WriteFailed naming the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from storage.atomic import FILE_MODE, FOLDER_MODE, raise_explained
from storage.disk import write_failure
from tasks.lora import networks
from tasks.lora.files import MANIFEST_FILE, STATE_FILE, partial_prefix
from tasks.lora.kohya_metadata import TrainingFacts, kohya_metadata, with_hashes
from tasks.models.sd_scripts_names import sd_scripts_unet_state
from tasks.sweep.plan import TrainingRunSpec
from tasks.sweep.provenance import provenance


def save_checkpoint(run: TrainingRunSpec, unet, adapter: str, step: int, checkpoint_id: str, folder: Path,
                    *, training_state: dict, facts: TrainingFacts, text_encoders: Sequence = (),
                    family: str = "sd15") -> Path:
    """Save the adapter at `step` into `folder` (replacing any earlier partial attempt).

    `facts`: the training items and start time the kohya metadata records.
    `text_encoders`: the pipeline's text encoders when their LoRA trained too (SD1.x: one, SDXL: two);
    saved beside the UNet's. `family`: the base model's ("sd15" or "sdxl"), which picks the diffusers
    loader and kohya metadata.
    """
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(folder), dir=folder.parent))
    except OSError as err:
        raise_explained(err, folder.parent)
    try:
        tmp.chmod(FOLDER_MODE)  # mkdtemp makes 0700; a results folder is shared as the user's umask says
        unet_state = get_peft_model_state_dict(unet, adapter_name=adapter)
        text_states = [text_encoder_lora_state(encoder, adapter) for encoder in text_encoders]
        # peft-format keys (lora_A/lora_B): diffusers' older key names cannot mix attention and conv layers.
        pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        text_layers = {}
        for name, encoder, state in zip(("text_encoder", "text_encoder_2"), text_encoders, text_states):
            text_layers[f"{name}_lora_layers"] = state
            text_layers[f"{name}_lora_adapter_metadata"] = adapter_metadata(encoder.peft_config[adapter])
        pipeline_class.save_lora_weights(
            tmp, unet_lora_layers=unet_state, safe_serialization=True,
            unet_lora_adapter_metadata=adapter_metadata(unet.peft_config[adapter]), **text_layers,
        )
        if run.network == "lora":  # UNet modules named as sd-scripts names them (SDXL: input_blocks_4_1_...)
            kohya = kohya_state_dict(sd_scripts_unet_state(unet_state, unet.config, family), run.alpha, *text_states,
                                     conv_alpha=networks.conv_rank_alpha(run)[1])
        else:  # DoRA, LoHa, LoKr: the LyCORIS layout (tasks.lora.networks), SDXL in sd-scripts' spelling too
            parts = dict(zip(("unet", "text_encoder", "text_encoder_2"),
                             (sd_scripts_unet_state(unet_state, unet.config, family), *text_states)))
            convs = dict.fromkeys(sd_scripts_unet_state(dict.fromkeys(networks.spatial_convs(unet, run.target_modules)),
                                                        unet.config, family), networks.conv_rank_alpha(run))
            kohya = networks.kohya_state_dict(run.network, run.rank, run.alpha, parts, convs, networks.dora_axis(run))
        metadata = with_hashes(kohya, kohya_metadata(run, step, family, facts))
        save_file(kohya, str(tmp / f"{checkpoint_id}.safetensors"), metadata=metadata)
        manifest = {"checkpoint_id": checkpoint_id, "step": step,
                    "run": run.model_dump(mode="json", exclude={"stop_at"}),  # the run, not how far one call went
                    "effective_batch_size": run.effective_batch_size,
                    "attention_processors": sorted({type(p).__name__ for p in unet.attn_processors.values()}),
                    "provenance": provenance()}
        torch.save(training_state, tmp / STATE_FILE)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        for file in tmp.iterdir():  # safetensors writes 0600; results are shared as the user's umask says
            file.chmod(FILE_MODE)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException as err:
        # Named before the partial folder is removed: torch.save's error hides the errno, the free space does not.
        failure = write_failure(err, folder.parent, guess_full=True) if isinstance(err, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is None or failure is err:
            raise
        raise failure from err
    return folder


def text_encoder_lora_state(text_encoder, adapter: str) -> dict[str, torch.Tensor]:
    """The text encoder's LoRA under the usual `text_model.` key prefix, which transformers 5's
    CLIPTextModel dropped from its own names; loaders and kohya tools expect it."""
    state = get_peft_model_state_dict(text_encoder, adapter_name=adapter)
    if hasattr(text_encoder, "text_model"):
        return state
    return {f"text_model.{k}": v for k, v in state.items()}


def kohya_state_dict(peft_state: dict[str, torch.Tensor], alpha: float,
                     text_state: dict[str, torch.Tensor] | None = None,
                     text_2_state: dict[str, torch.Tensor] | None = None,
                     conv_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """kohya keys (`lora_unet_*`, text encoders `.lora_down/lora_up/alpha`) with the REAL alpha; a convolution
    with a kernel larger than 1 x 1 gets `conv_alpha` when given (kohya's rule for conv_alpha).

    diffusers' converter writes alpha = rank; a reloaded LoRA would then be scaled wrongly
    whenever alpha != rank, so every `.alpha` is overwritten. It names the text encoders
    `lora_te1_` and `lora_te2_` (SDXL style, kept when `text_2_state` is given); SD1.x tools
    expect `lora_te_` for the one text encoder.
    """
    prefixed = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in peft_state.items()}
    prefixed |= {f"text_encoder.{k}": v.detach().cpu().contiguous() for k, v in (text_state or {}).items()}
    prefixed |= {f"text_encoder_2.{k}": v.detach().cpu().contiguous() for k, v in (text_2_state or {}).items()}
    converted = convert_state_dict_to_kohya(prefixed)
    if not text_2_state:
        converted = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in converted.items()}
    return {k: torch.tensor(float(module_alpha(converted, k.removesuffix(".alpha"), alpha, conv_alpha)))
            if k.endswith(".alpha") else v for k, v in converted.items()}


def module_alpha(kohya: dict[str, torch.Tensor], module: str, alpha: float, conv_alpha: float | None) -> float:
    """`conv_alpha` for a module whose lora_down is a k x k convolution (k > 1), else `alpha`."""
    down = kohya.get(f"{module}.lora_down.weight")
    spatial = down is not None and down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
    return conv_alpha if spatial and conv_alpha is not None else alpha



def adapter_metadata(config) -> dict:
    """peft's adapter config as the diffusers file stores it, with its sets as sorted lists: peft keeps
    target_modules in a set, whose order changes between processes, so the same weights would otherwise
    give files with different bytes."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()}
