"""Sampler registry: AUTOMATIC1111 display names mapped to diffusers scheduler classes and options.

Names follow the diffusers docs table "A1111/k-diffusion -> diffusers". Each entry also carries the
A1111 1.9+ "Sampler" and "Schedule type" pair that reproduces it, for PNG metadata. No torch: the
spec resolves sampler names while it validates (tasks.render.samplers builds the schedulers).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# A1111 1.9+ schedule-type labels, with the internal names A1111 also accepts.
A1111_SCHEDULE_TYPES: tuple[str, ...] = (
    "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
    "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
)
_SCHEDULE_LOOKUP = {
    **{label: label for label in A1111_SCHEDULE_TYPES},
    **{label.lower().replace(" ", "_"): label for label in A1111_SCHEDULE_TYPES},
    "SGMUniform": "SGM Uniform",
}

# What A1111 1.9+ means by "Automatic" for each sampler (its `scheduler` sampler option);
# timestep samplers (DDIM, UniPC) ignore the schedule type, so theirs stays "Automatic".
_A1111_AUTOMATIC = {
    "Euler": "Uniform", "Euler a": "Uniform", "Heun": "Uniform", "LMS": "Uniform",
    "DPM2": "Karras", "DPM2 a": "Karras", "DPM++ 2M": "Karras", "DPM++ SDE": "Karras",
    "DPM++ 2M SDE": "Exponential", "DDIM": "Automatic", "UniPC": "Automatic",
}

# Pinned so the A1111 schedule type written to PNGs is true whatever the base config says
# (SD1.5 folders saved by diffusers carry PNDM's "leading", which would skip t=999).
_LINSPACE = {"timestep_spacing": "linspace"}
_KARRAS = {"timestep_spacing": "linspace", "use_karras_sigmas": True}
_SDE_2M = {"algorithm_type": "sde-dpmsolver++"}
# A1111's DDIM: timesteps range(0, 1000, 1000 // steps) + 1, no clipping, alpha_prev[0] = alpha[0].
_DDIM = {"timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}


@dataclass(frozen=True)
class SamplerDef:
    """One sampler: how to build its diffusers scheduler and how A1111 names it.

    `stochastic`: the sampler adds fresh noise every step, so images depend on the noise seed.
    `seed_option`: the scheduler config key that seeds that noise when the call's torch.Generator
    does not (DPM++ SDE's Brownian tree); `make_scheduler(..., seed=...)` fills it.
    """

    name: str
    scheduler_class: str
    options: Mapping[str, Any] = field(hash=False)
    a1111_sampler: str
    a1111_schedule_type: str
    stochastic: bool
    seed_option: str | None = None


def _entry(
    name: str, cls: str, options: Mapping[str, Any], a1111: tuple[str, str],
    stochastic: bool = False, seed_option: str | None = None,
) -> SamplerDef:
    """A registry entry with read-only options, so no caller can change a sampler for everyone."""
    return SamplerDef(name, cls, MappingProxyType(dict(options)), a1111[0], a1111[1], stochastic, seed_option)


_MULTISTEP = "DPMSolverMultistepScheduler"
_SDE = "DPMSolverSDEScheduler"
_REGISTRY: dict[str, SamplerDef] = {d.name: d for d in (
    _entry("Euler", "EulerDiscreteScheduler", _LINSPACE, ("Euler", "Automatic")),
    _entry("Euler a", "EulerAncestralDiscreteScheduler", _LINSPACE, ("Euler a", "Automatic"), stochastic=True),
    _entry("Heun", "HeunDiscreteScheduler", _LINSPACE, ("Heun", "Automatic")),
    _entry("LMS", "LMSDiscreteScheduler", _LINSPACE, ("LMS", "Automatic")),
    _entry("LMS Karras", "LMSDiscreteScheduler", _KARRAS, ("LMS", "Karras")),
    _entry("DDIM", "DDIMScheduler", _DDIM, ("DDIM", "Automatic")),
    _entry("DPM2", "KDPM2DiscreteScheduler", _LINSPACE, ("DPM2", "Uniform")),
    _entry("DPM2 a", "KDPM2AncestralDiscreteScheduler", _LINSPACE, ("DPM2 a", "Uniform"), stochastic=True),
    _entry("DPM++ 2M", _MULTISTEP, _LINSPACE, ("DPM++ 2M", "SGM Uniform")),
    _entry("DPM++ 2M Karras", _MULTISTEP, _KARRAS, ("DPM++ 2M", "Karras")),
    _entry("DPM++ 2M SDE", _MULTISTEP, {**_LINSPACE, **_SDE_2M}, ("DPM++ 2M SDE", "SGM Uniform"), stochastic=True),
    _entry("DPM++ 2M SDE Karras", _MULTISTEP, {**_KARRAS, **_SDE_2M}, ("DPM++ 2M SDE", "Karras"), stochastic=True),
    _entry("DPM++ SDE", _SDE, _LINSPACE, ("DPM++ SDE", "Uniform"), True, "noise_sampler_seed"),
    _entry("DPM++ SDE Karras", _SDE, _KARRAS, ("DPM++ SDE", "Karras"), True, "noise_sampler_seed"),
    _entry("UniPC", "UniPCMultistepScheduler", _LINSPACE, ("UniPC", "Automatic")),
)}

SAMPLER_NAMES: tuple[str, ...] = tuple(_REGISTRY)
A1111_SAMPLER_NAMES: tuple[str, ...] = tuple(dict.fromkeys(d.a1111_sampler for d in _REGISTRY.values()))


def _effective_schedule(a1111_sampler: str, label: str) -> str:
    """The schedule A1111 actually uses: "Automatic" means the sampler's own default."""
    return _A1111_AUTOMATIC[a1111_sampler] if label == "Automatic" else label


_BY_PAIR: dict[tuple[str, str], SamplerDef] = {
    (d.a1111_sampler, _effective_schedule(d.a1111_sampler, d.a1111_schedule_type)): d for d in _REGISTRY.values()
}


def _unknown(kind: str, value: str, valid: Sequence[str]) -> ValueError:
    """A ValueError naming the bad value, the closest valid one and every valid one."""
    close = difflib.get_close_matches(value, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {value!r}.{hint} Valid: {', '.join(repr(v) for v in valid)}")


def resolve_sampler(name: str, schedule_type: str | None = None) -> SamplerDef:
    """Look up a sampler by registry name, or by an A1111 1.9+ (Sampler, Schedule type) pair.

    Without `schedule_type`, `name` is a registry name ("DPM++ 2M Karras"). With it, `name` is an
    A1111 sampler and "Automatic" means A1111's default for it (Karras for "DPM++ 2M").
    """
    if schedule_type is None:
        if name not in _REGISTRY:
            raise _unknown("sampler", name, SAMPLER_NAMES)
        return _REGISTRY[name]
    if name not in _A1111_AUTOMATIC:
        raise _unknown("A1111 sampler", name, A1111_SAMPLER_NAMES)
    label = _SCHEDULE_LOOKUP.get(schedule_type)
    if label is None:
        raise _unknown("A1111 schedule type", schedule_type, A1111_SCHEDULE_TYPES)
    effective = _effective_schedule(name, label)
    found = _BY_PAIR.get((name, effective))
    if found is None:
        supported = sorted({d.a1111_schedule_type for d in _REGISTRY.values() if d.a1111_sampler == name})
        meaning = f" (A1111's Automatic for {name} is {effective})" if label == "Automatic" else ""
        raise ValueError(
            f"sampler {name!r} with schedule type {schedule_type!r}{meaning} is not in the registry; "
            f"schedule types supported for {name!r}: {', '.join(repr(s) for s in supported)}"
        )
    return found


def a1111_pair_problems(name: str, schedule_type: str) -> list[str]:
    """Every problem with an A1111 (Sampler, Schedule type) pair, so a spec reports them all at once."""
    problems = []
    if name not in _A1111_AUTOMATIC:
        problems.append(str(_unknown("A1111 sampler", name, A1111_SAMPLER_NAMES)))
    if schedule_type not in _SCHEDULE_LOOKUP:
        problems.append(str(_unknown("A1111 schedule type", schedule_type, A1111_SCHEDULE_TYPES)))
    if not problems:
        try:
            resolve_sampler(name, schedule_type)
        except ValueError as err:
            problems.append(str(err))
    return problems
