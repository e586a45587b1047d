"""Is a LoRA file usable, and does it fit a base model? Read from its tensors and the model's configs.

A LoRA on a cross-attention key or value projection (`attn2.to_k` / `attn2.to_v`) reads the text
embedding, so the input width of its down (A) matrix is the UNet's `cross_attention_dim`: 768 for
SD1.x, 1024 for SD2.x, 2048 for SDXL. A text-encoder LoRA's down matrices read that encoder's
`hidden_size`, and a second-encoder LoRA needs a model with two (SDXL). A LoRA that fails these
would fail to load at render time, after training: it is refused before any work instead.
Nothing is loaded: safetensors headers and config.json files only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from tasks.models.base_model import PICKLE_SUFFIXES

KNOWN_WIDTHS = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_DOWN = re.compile(r"(lora_down|lora\.down|lora_A)(\.default)?\.weight$")
# Key prefixes per part, in kohya and diffusers/peft spellings.
_TEXT_2 = ("lora_te2_", "text_encoder_2.")
_TEXT_1 = ("lora_te_", "lora_te1_", "text_encoder.")
_UNET = ("lora_unet_", "unet.")


def lora_fit_problems(lora_file: Path, model_dir: Path) -> list[str]:
    """Why `lora_file` cannot be applied to the diffusers model (or config folder) `model_dir`; [] if it can."""
    widths = _down_widths(lora_file)
    problems = []
    unet = _config(model_dir, "unet")
    model_width = unet.get("cross_attention_dim") if unet else None
    lora_width = widths.get("cross_attention")
    if model_width is not None and lora_width is not None and lora_width != model_width:
        problems.append(f"its cross-attention layers read {lora_width}-wide text embeddings "
                        f"({_family(lora_width)}), the model's UNet {model_width} ({_family(model_width)}); "
                        "a LoRA fits only the model family it was trained on")
    for part, label in (("text_encoder", "text encoder"), ("text_encoder_2", "second text encoder")):
        width = widths.get(part)
        if width is None:
            continue
        config = _config(model_dir, part)
        if config is None:
            problems.append(f"it has {label} layers (an SDXL LoRA) and the model has no {part}")
        elif config.get("hidden_size") not in (None, width):
            problems.append(f"its {label} layers read width {width}, the model's {part} {config['hidden_size']}")
    return problems


def _down_widths(lora_file: Path) -> dict[str, int]:
    """Input widths of the LoRA's down matrices: cross-attention k/v, and each text encoder's."""
    widths: dict[str, int] = {}
    with safe_open(str(lora_file), framework="pt") as handle:
        for key in handle.keys():
            if not _DOWN.search(key):
                continue
            part = _part(key)
            if part == "unet" and "attn2" in key and re.search(r"to_[kv]", key):
                part = "cross_attention"
            elif part == "unet":
                continue
            if part is not None and part not in widths:
                widths[part] = handle.get_slice(key).get_shape()[1]
    return widths


def _part(key: str) -> str | None:
    for prefixes, part in ((_TEXT_2, "text_encoder_2"), (_TEXT_1, "text_encoder"), (_UNET, "unet")):
        if key.startswith(prefixes):
            return part
    return None


def _config(model_dir: Path, component: str) -> dict | None:
    file = Path(model_dir) / component / "config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _family(width: int) -> str:
    return KNOWN_WIDTHS.get(width, "not a released model family's width")


def lora_file_problems(file: Path) -> list[str]:
    """Problems with a LoRA file to stack on renders: missing, a pickle, or not a kohya/diffusers LoRA."""
    expected = "expected a local .safetensors LoRA file (kohya or diffusers format)"
    if not file.is_file():
        return [f"LoRA file {file}: {'is a folder' if file.is_dir() else 'does not exist'}; {expected}"]
    if file.suffix.lower() != ".safetensors":
        pickle = file.suffix.lower() in PICKLE_SUFFIXES
        kind = "a pickle, which can run code when loaded" if pickle else "not safetensors"
        return [f"LoRA file {file}: {file.suffix or 'no suffix'} is {kind}; safetensors only: {expected}"]
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for a bad header
        return [f"LoRA file {file}: not a readable safetensors file ({error}); {expected}"]
    others = [k for k in keys if "lora" not in k]
    if not keys or others:
        return [f"LoRA file {file}: not a LoRA ({len(others)} of {len(keys)} tensors are not LoRA weights, e.g. "
                f"{(others or ['(none)'])[0]!r}); expected kohya lora_unet_*/lora_te_* or diffusers *.lora_A/B keys"]
    return lora_state_dict_problems(file)


def lora_state_dict_problems(file: Path) -> list[str]:
    """Read it as diffusers' load_lora_weights will, so a file it cannot convert fails here, before any work."""
    try:
        state_dict, _alphas = StableDiffusionPipeline.lora_state_dict(
            str(file.parent), weight_name=file.name, use_safetensors=True, local_files_only=True)
    except Exception as error:  # diffusers raises ValueError, KeyError, ... for layouts it does not know
        return [f"LoRA file {file}: diffusers cannot read it as a LoRA ({type(error).__name__}: {error})"]
    if not state_dict or not all("lora" in key for key in state_dict):
        return [f"LoRA file {file}: diffusers does not read it as a LoRA of the UNet or text encoder"]
    return []
