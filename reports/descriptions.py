"""Short readable texts for the report: what a run was trained with, which extra LoRAs an image carries.

Plain strings only; the template and report.js escape them like any other text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

SEPARATOR = " · "


def number(value: float | int) -> str:
    """A compact number: 5.0 -> "5", 5e-05 -> "5e-5", 0.05 -> "0.05"."""
    return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m.group(1).replace('+', '')}{m.group(2)}", f"{value:g}")


def _target(run: dict[str, Any]) -> str | None:
    if run.get("target_preset") not in (None, "attention"):
        return str(run["target_preset"])
    if run.get("target_preset") is None and run.get("target_modules"):
        return "modules " + ", ".join(run["target_modules"])  # a list of the spec's own, no preset
    return None


def _scheduler(run: dict[str, Any]) -> str | None:
    scheduler, warmup, cycles = run.get("lr_scheduler"), run.get("lr_warmup_steps"), run.get("lr_cycles")
    details = [f"warmup {warmup}"] * bool(warmup) + [f"{cycles} cycles"] * (cycles not in (None, 1))
    if scheduler in (None, "constant") and not details:
        return None
    return (scheduler or "LR schedule") + (f" ({', '.join(details)})" if details else "")


def _accumulation(run: dict[str, Any]) -> str | None:
    steps, effective = run.get("gradient_accumulation_steps"), run.get("effective_batch_size")
    if steps in (None, 1):
        return None
    return f"accumulation {steps}" + (f" (batch {effective})" if effective is not None else "")


def _buckets(run: dict[str, Any]) -> str | None:
    if not run.get("buckets"):
        return None
    step = run.get("bucket_step")
    return "buckets" + (f" (step {step})" if step is not None else "")


def _text_encoder(run: dict[str, Any]) -> str | None:
    if not run.get("train_text_encoder"):
        return None
    lr = run.get("text_encoder_lr")
    return "text encoder" + (f" LR {number(lr)}" if lr is not None else "")


def _when(column: str, is_default: Callable[[Any], bool], text: Callable[[Any], str]) -> Callable[[dict], str | None]:
    """A fragment for one column: nothing when NULL (not recorded) or at its default."""
    def fragment(run: dict[str, Any]) -> str | None:
        value = run.get(column)
        return None if value is None or is_default(value) else text(value)
    return fragment


FRAGMENTS: tuple[Callable[[dict[str, Any]], str | None], ...] = (
    _target,
    _when("lora_dropout", lambda v: v == 0, lambda v: f"dropout {number(v)}"),
    _scheduler,
    _accumulation,
    _when("min_snr_gamma", lambda v: False, lambda v: f"min-SNR {number(v)}"),
    _when("noise_offset", lambda v: v == 0, lambda v: f"noise offset {number(v)}"),
    _when("mixed_precision", lambda v: v == "no", str),
    _when("gradient_checkpointing", lambda v: not v, lambda v: "gradient checkpointing"),
    _when("optimizer", lambda v: v == "adamw", str),
    _when("memory_preset_gib", lambda v: False, lambda v: f"memory preset {number(v)} GiB"),
    _buckets,
    _when("validation_images", lambda v: v == 0, lambda v: f"{v} validation image{'s' * (v != 1)}"),
    # Where encodings were kept does not change results; encoding every step ("off") draws VAE samples differently.
    _when("encoding_cache", lambda v: v != "off", lambda v: "encoding cache off"),
    _when("max_grad_norm", lambda v: False, lambda v: f"grad clip {number(v)}"),  # NULL: no clipping
    _when("clip_skip", lambda v: v == 1, lambda v: f"clip skip {v}"),
    _text_encoder,
)
OPTION_COLUMNS = ("target_preset", "target_modules", "lora_dropout", "lr_scheduler", "lr_warmup_steps", "lr_cycles",
                  "gradient_accumulation_steps", "effective_batch_size", "min_snr_gamma", "noise_offset",
                  "mixed_precision", "gradient_checkpointing", "optimizer", "train_text_encoder", "text_encoder_lr",
                  "validation_images", "memory_preset_gib", "buckets", "bucket_step", "encoding_cache",
                  "max_grad_norm", "clip_skip")


def options_recorded(run: dict[str, Any]) -> bool:
    """False for runs files written before the option columns existed (every option NULL)."""
    return any(run.get(column) is not None for column in OPTION_COLUMNS)


def run_options(run: dict[str, Any]) -> str:
    """The run's training options that differ from the plain loop, e.g. "locon · cosine (warmup 10) · bf16"."""
    return SEPARATOR.join(text for fragment in FRAGMENTS if (text := fragment(run)))


def parse_extra_loras(value: str | None) -> list[dict[str, Any]]:
    """The images.extra_loras JSON as [{name, weight, sha256, path}]; text that is not such a list
    becomes one entry named by the raw text, so nothing recorded is hidden."""
    if not value:
        return []
    try:
        loaded = json.loads(value)
    except ValueError:
        loaded = None
    if not isinstance(loaded, list) or not all(isinstance(x, dict) for x in loaded):
        return [{"name": value, "weight": None, "sha256": None, "path": None}]
    return [{key: x.get(key) for key in ("name", "weight", "sha256", "path")} for x in loaded]


def lora_text(lora: dict[str, Any]) -> str:
    """ "style 0.7": name and weight (the name alone when no numeric weight was recorded)."""
    weight = lora.get("weight")
    numeric = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    return f"{lora.get('name')} {number(weight)}" if numeric else str(lora.get("name"))


def extra_loras_text(loras: Sequence[dict[str, Any]]) -> str:
    """ "+ style 0.7, grain 0.5", or "" for an image without extra LoRAs."""
    return "+ " + ", ".join(lora_text(x) for x in loras) if loras else ""
