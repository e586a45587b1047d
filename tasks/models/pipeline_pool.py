"""Base-model pipelines kept loaded between render jobs in one process.

Loading a pipeline is most of a small render job's fixed cost (the tiny model's tokenizer alone
takes longer to parse than its 8 images take to render; a real SDXL pipeline takes seconds). A
render job borrows a pipeline with `borrowed_pipeline`; it comes back clean: every LoRA adapter
unloaded (peft's layers removed, the base modules put back untouched: adapters are never fused),
the original scheduler back, and the borrower must have set any weight patches it applied back to
the base weights. A job that raises does not return its pipeline, since its state is unknown.

One exception saves re-injecting the same LoRA layers job after job: a borrower may name a
`keep_adapter`. If the pipeline comes back holding that adapter alone, in its UNet alone, it stays,
and the next borrower naming the same adapter gets it and must replace its weights in place
(`copy_adapter_weights` when the file holds exactly the adapter's tensors, else diffusers' `hotswap`,
which zeroes what the new file lacks and refuses what it cannot swap); any other borrower gets the
pipeline with it unloaded.

At most `IDLE_LIMIT` idle pipelines are kept (least recently used leave first). Training calls
`release_idle_pipelines()` before it loads its own model, so an idle render pipeline never holds
GPU (or CPU) memory a training run needs.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tasks.models.base_model import MODEL_BUILD_LOCK, load_pipeline

log = logging.getLogger(__name__)
IDLE_LIMIT = 2

PoolKey = tuple[str, str | None, str, str]  # path, config, device, dtype


@dataclass
class _Idle:
    key: PoolKey
    pipe: object
    scheduler: object  # the scheduler the pipeline was loaded with (jobs swap in others)


_lock = threading.Lock()
_idle: list[_Idle] = []  # oldest first
_loads = 0  # pipelines loaded through the pool in this process (tests and benchmarks read it)
_copies = 0  # adapters whose weights copy_adapter_weights replaced in place


def pipelines_loaded() -> int:
    """How many pipelines the pool has loaded in this process so far."""
    return _loads


def adapter_copies() -> int:
    """How many times `copy_adapter_weights` replaced an adapter's weights in this process so far."""
    return _copies


def copy_adapter_weights(unet: torch.nn.Module, file: Path, adapter: str) -> bool:
    """Copy a diffusers-format UNet LoRA file's tensors into `adapter`'s existing layers, in place; True when
    done. False, with nothing changed, unless the file holds exactly the adapter's LoRA tensors, shape for shape:
    then the caller loads it another way. What diffusers' hotswap does for an equally configured adapter, without
    its state-dict conversions and whole-model traversals (SD1.5 on the CPU: 66-83 ms a swap there)."""
    global _copies
    params = {name: p for name, p in unet.named_parameters()
              if name.endswith(f".{adapter}.weight") and (".lora_A." in name or ".lora_B." in name)}
    with safe_open(str(file), framework="pt") as handle:
        names = {_adapter_parameter(key, adapter): key for key in handle.keys()}  # noqa: SIM118
        if names.keys() != params.keys() or any(
                tuple(handle.get_slice(key).get_shape()) != tuple(params[name].shape) for name, key in names.items()):
            return False
        with torch.no_grad():
            for name, key in names.items():
                params[name].copy_(handle.get_tensor(key))
    with _lock:
        _copies += 1
    return True


def _adapter_parameter(key: str, adapter: str) -> str:
    """"unet.<module>.lora_A.weight" -> "<module>.lora_A.<adapter>.weight" (anything else: a name no layer has)."""
    if not key.startswith("unet.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
        return f"<not a UNet LoRA tensor: {key}>"
    module, kind, _ = key.removeprefix("unet.").rsplit(".", 2)
    return f"{module}.{kind}.{adapter}.weight"


@contextlib.contextmanager
def borrowed_pipeline(path: str, *, config: str | None, device: str, torch_dtype: torch.dtype,
                      keep_adapter: str | None = None) -> Iterator[object]:
    """A loaded pipeline for the base model, from the pool or freshly loaded; back to the pool afterwards.

    It holds no adapter, or (with `keep_adapter`) possibly that one adapter in its UNet, left by the
    previous borrower: the caller replaces its weights (see the module docstring)."""
    global _loads
    key: PoolKey = (path, config, device, str(torch_dtype))
    with _lock:
        found = next((i for i, idle in enumerate(_idle) if idle.key == key), None)
        entry = _idle.pop(found) if found is not None else None
    if entry is None:
        pipe = load_pipeline(path, config=config, device=device, torch_dtype=torch_dtype)
        entry = _Idle(key, pipe, pipe.scheduler)
        with _lock:
            _loads += 1
    else:
        _clean(entry, keep_adapter)
    entry.pipe.set_progress_bar_config(disable=True)
    yield entry.pipe  # an exception here propagates and the pipeline is dropped
    _clean(entry, keep_adapter)
    with _lock:
        _idle.append(entry)
        while len(_idle) > IDLE_LIMIT:
            _idle.pop(0)


def release_idle_pipelines() -> int:
    """Drop every idle pipeline (and the CUDA cache they held); returns how many were dropped."""
    with _lock:
        dropped = len(_idle)
        _idle.clear()
    if dropped:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("released %d idle render pipeline(s)", dropped)
    return dropped


def unet_adapters(pipe) -> set[str]:
    """The names of the adapters loaded in the pipeline's UNet."""
    return set(getattr(pipe.unet, "peft_config", {}))


def _clean(entry: _Idle, keep_adapter: str | None) -> None:
    """Unload every adapter (unless `keep_adapter` is all there is, UNet only); the original scheduler back."""
    pipe = entry.pipe
    encoders = [m for name, m in _components(pipe) if name != "unet"]
    kept = (keep_adapter is not None and unet_adapters(pipe) == {keep_adapter}
            and not any(_holds_adapter(m) for m in encoders))
    if not kept:
        with MODEL_BUILD_LOCK:
            if any(_holds_adapter(m) for _, m in _components(pipe)):
                pipe.unload_lora_weights()
        leftover = [name for name, module in _components(pipe) if _has_peft_layers(module)]
        if leftover:
            raise RuntimeError(f"render pipeline still holds LoRA layers in {leftover} after unloading")
    pipe.scheduler = entry.scheduler


def _components(pipe) -> list[tuple[str, torch.nn.Module]]:
    names = ("unet", "text_encoder", "text_encoder_2")
    return [(n, getattr(pipe, n)) for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)]


def _holds_adapter(module: torch.nn.Module) -> bool:
    return _has_peft_layers(module) or hasattr(module, "peft_config")


def _has_peft_layers(module: torch.nn.Module) -> bool:
    return any(hasattr(m, "base_layer") for m in module.modules())
