"""Build a sampler's diffusers scheduler from the base model's scheduler config, and seed it.

The registry of names lives in tasks.sweep.sampler_names; a scheduler is built from the base
model's scheduler config, so swapping samplers never reloads the model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

import diffusers
import torch
from diffusers import SchedulerMixin

from tasks.sweep.sampler_names import SamplerDef, resolve_sampler

# Config keys that select a sampler variant rather than describe the model's noise schedule: the
# sampler owns them, so a base config taken from an already-swapped scheduler cannot leak Karras
# sigmas or an SDE algorithm into the next sampler.
_VARIANT_KEYS = frozenset({
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
    "algorithm_type", "solver_type", "solver_order", "lower_order_final", "euler_at_final",
    "final_sigmas_type", "noise_sampler_seed",
})

def scheduler_options(sampler: SamplerDef, seed: int | Sequence[int] | None = None) -> dict[str, Any]:
    """The keyword options `make_scheduler` passes to `from_config`, seed included where one is needed."""
    options = dict(sampler.options)
    if sampler.seed_option is None:
        return options
    if seed is None:
        raise ValueError(
            f"sampler {sampler.name!r} draws its noise from the scheduler ({sampler.seed_option}): "
            "pass seed= (one int, or one per image of the batch) or images are not reproducible"
        )
    options[sampler.seed_option] = _seed_list(seed) if isinstance(seed, Sequence) else int(seed)
    return options


def _seed_list(seeds: Sequence[int]) -> list[int]:
    """Per-image seeds of a batch; an empty batch is a caller bug, not something to guess around."""
    if not seeds:
        raise ValueError("seed: an empty list of seeds; give one seed per image")
    return [int(s) for s in seeds]


def make_scheduler(
    sampler: str | SamplerDef, base_scheduler_config: Mapping[str, Any], *, seed: int | Sequence[int] | None = None
) -> SchedulerMixin:
    """Build the sampler's scheduler from the base model's scheduler config, without reloading the model.

    `seed` seeds samplers whose noise lives in the scheduler (DPM++ SDE: one int, or a list with one
    seed per image of the batch, which makes each image independent of the batch); others ignore it.
    Costs ~0.5 ms: a cached template is copied, so rebuilding per image is cheap.
    """
    definition = sampler if isinstance(sampler, SamplerDef) else resolve_sampler(sampler)
    options = scheduler_options(definition, seed)
    config = {k: v for k, v in base_scheduler_config.items() if k not in _VARIANT_KEYS}
    scheduler = copy.deepcopy(_template(definition, config))
    if definition.seed_option is not None:
        # DPMSolverSDEScheduler reads the attribute; the config copy keeps the seed in provenance.
        setattr(scheduler, definition.seed_option, options[definition.seed_option])
        scheduler.register_to_config(**{definition.seed_option: options[definition.seed_option]})
    return scheduler


_TEMPLATES: dict[tuple[str, str], SchedulerMixin] = {}
_MAX_TEMPLATES = 64


def _template(definition: SamplerDef, config: Mapping[str, Any]) -> SchedulerMixin:
    """An unseeded scheduler per (sampler, base config), built once: DPM++ SDE's constructor takes ~50 ms."""
    key = (definition.name, json.dumps(config, sort_keys=True, default=repr))
    if key not in _TEMPLATES:
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.clear()
        options = {k: v for k, v in definition.options.items() if k != definition.seed_option}
        _TEMPLATES[key] = getattr(diffusers, definition.scheduler_class).from_config(dict(config), **options)
    return _TEMPLATES[key]


def scheduler_call_kwargs(sampler: SamplerDef, seed: int | Sequence[int]) -> dict[str, Any]:
    """Pipeline-call keyword arguments that seed one image (an int) or a batch (one seed per image).

    Every sampler draws its initial latents, and ancestral/SDE step noise, from these CPU generators,
    so pixels do not depend on the device or the batch. DPM++ SDE also needs make_scheduler(seed=...);
    `sampler` is taken so every call site reads the same should a sampler ever need more.
    """
    if not isinstance(seed, Sequence):
        return {"generator": torch.Generator(device="cpu").manual_seed(int(seed))}
    return {"generator": [torch.Generator(device="cpu").manual_seed(s) for s in _seed_list(seed)]}
