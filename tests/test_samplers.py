"""The sampler registry: names, A1111 pairs, scheduler building and per-sampler render determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverSDEScheduler

from tasks.render.samplers import make_scheduler, scheduler_call_kwargs
from tasks.sweep.sampler_names import A1111_SAMPLER_NAMES, SAMPLER_NAMES, resolve_sampler

# torchsde warns when diffusers queries its Brownian tree a float32 rounding below sigma_min
# (google-research/torchsde#152); harmless, and not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Should have ta>=t0:UserWarning")

# SD1.5's scheduler_config.json, as published.
SD15_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}

# The diffusers docs table "A1111/k-diffusion -> diffusers": class and the options that define the variant.
DOCS_TABLE = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {"use_karras_sigmas": False}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


def test_registry_is_the_docs_table() -> None:
    assert set(SAMPLER_NAMES) == set(DOCS_TABLE)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_builds_from_an_sd15_config(name: str) -> None:
    expected_class, expected_options = DOCS_TABLE[name]
    scheduler = make_scheduler(name, SD15_CONFIG, seed=0)
    assert type(scheduler).__name__ == expected_class
    for key, value in expected_options.items():
        assert scheduler.config[key] == value, key
    assert scheduler.config["beta_schedule"] == "scaled_linear"
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) >= 10


def test_unknown_name_names_the_value_suggests_and_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        resolve_sampler("DPM++ 2M Karas")
    message = str(err.value)
    assert "'DPM++ 2M Karas'" in message
    assert "Did you mean 'DPM++ 2M Karras'?" in message
    assert all(repr(name) in message for name in SAMPLER_NAMES)


@pytest.mark.parametrize(("sampler", "schedule", "expected"), [
    ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),
    ("DPM++ 2M", "karras", "DPM++ 2M Karras"),
    ("DPM++ 2M", "Automatic", "DPM++ 2M Karras"),  # A1111's Automatic for DPM++ 2M is Karras
    ("DPM++ 2M", "SGM Uniform", "DPM++ 2M"),
    ("DPM++ 2M SDE", "Karras", "DPM++ 2M SDE Karras"),
    ("DPM++ SDE", "Karras", "DPM++ SDE Karras"),
    ("DPM++ SDE", "Uniform", "DPM++ SDE"),
    ("LMS", "Karras", "LMS Karras"),
    ("Euler", "Automatic", "Euler"),
    ("Euler", "Uniform", "Euler"),
    ("Euler a", "Automatic", "Euler a"),
    ("DPM2", "Uniform", "DPM2"),
    ("DDIM", "Automatic", "DDIM"),
    ("UniPC", "Automatic", "UniPC"),
])
def test_a1111_sampler_and_schedule_type_pairs_resolve(sampler: str, schedule: str, expected: str) -> None:
    assert resolve_sampler(sampler, schedule).name == expected


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_each_entry_reads_back_from_the_pair_it_writes(name: str) -> None:
    entry = resolve_sampler(name)
    assert entry.a1111_sampler in A1111_SAMPLER_NAMES
    assert resolve_sampler(entry.a1111_sampler, entry.a1111_schedule_type) == entry


@pytest.mark.parametrize(("sampler", "schedule", "fragments"), [
    ("DPM2", "Automatic", ["A1111's Automatic for DPM2 is Karras", "'Uniform'"]),
    ("Euler", "Karras", ["'Euler'", "'Karras'", "'Automatic'"]),
    ("DPM++ 2M", "Karas", ["unknown A1111 schedule type 'Karas'", "Did you mean 'Karras'?", "'SGM Uniform'"]),
    ("DPM++ 2M Karras", "Karras", ["unknown A1111 sampler 'DPM++ 2M Karras'", "'DPM++ 2M'"]),
])
def test_bad_pairs_say_what_is_supported(sampler: str, schedule: str, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        resolve_sampler(sampler, schedule)
    assert all(fragment in str(err.value) for fragment in fragments), str(err.value)


def test_sampler_seeded_in_the_scheduler_refuses_to_build_without_a_seed() -> None:
    with pytest.raises(ValueError, match="DPM\\+\\+ SDE.*pass seed="):
        make_scheduler("DPM++ SDE", SD15_CONFIG)


def test_seed_reaches_the_scheduler_and_its_config() -> None:
    single = make_scheduler("DPM++ SDE Karras", SD15_CONFIG, seed=5)
    batch = make_scheduler("DPM++ SDE Karras", SD15_CONFIG, seed=[5, 6])
    assert (single.noise_sampler_seed, single.config["noise_sampler_seed"]) == (5, 5)
    assert batch.noise_sampler_seed == [5, 6]
    assert make_scheduler("DPM++ SDE Karras", SD15_CONFIG, seed=7).noise_sampler_seed == 7  # copies, not shared


def test_variant_options_of_a_swapped_scheduler_do_not_leak_into_the_next() -> None:
    swapped = make_scheduler("DPM++ 2M SDE Karras", SD15_CONFIG).config
    plain = make_scheduler("DPM++ 2M", swapped)
    assert plain.config["use_karras_sigmas"] is False
    assert plain.config["algorithm_type"] == "dpmsolver++"


@pytest.mark.parametrize("name", ["Euler", "DPM++ 2M", "LMS Karras"])
def test_schedule_ignores_the_base_configs_timestep_spacing(name: str) -> None:
    schedules = []
    for spacing in ("leading", "trailing", None):
        config = SD15_CONFIG if spacing is None else {**SD15_CONFIG, "timestep_spacing": spacing}
        scheduler = make_scheduler(name, config)
        scheduler.set_timesteps(5)
        schedules.append(scheduler.sigmas)
    assert all(torch.equal(schedules[0], s) for s in schedules[1:])
    assert schedules[0][0] == pytest.approx(14.6146, abs=1e-3)  # starts at t=999, as A1111 does


def test_call_kwargs_seed_one_cpu_generator_per_image() -> None:
    sampler = resolve_sampler("Euler a")
    single = scheduler_call_kwargs(sampler, 3)["generator"]
    batch = scheduler_call_kwargs(sampler, [3, 4])["generator"]
    assert single.device.type == "cpu" and single.initial_seed() == 3
    assert [g.initial_seed() for g in batch] == [3, 4]
    with pytest.raises(ValueError, match="empty list of seeds"):
        scheduler_call_kwargs(sampler, [])


def _render(pipe, name: str, prompts: list[str], seeds: list[int], steps: int = 4) -> np.ndarray:
    """Render through make_scheduler + scheduler_call_kwargs, as the renderer does."""
    sampler = resolve_sampler(name)
    seed: int | list[int] = seeds[0] if len(seeds) == 1 else seeds
    pipe.scheduler = make_scheduler(sampler, BASE_CONFIGS[id(pipe)], seed=seed)
    result = pipe(prompts, num_inference_steps=steps, output_type="np", width=64, height=64,
                  **scheduler_call_kwargs(sampler, seed))
    return result.images


BASE_CONFIGS: dict[int, dict] = {}


@pytest.fixture()
def pipe(tiny_pipeline):
    """The tiny pipeline, its own scheduler config kept aside as the base every sampler builds from."""
    tiny_pipeline.set_progress_bar_config(disable=True)
    BASE_CONFIGS[id(tiny_pipeline)] = dict(tiny_pipeline.scheduler.config)
    yield tiny_pipeline
    del BASE_CONFIGS[id(tiny_pipeline)]


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_sampler_renders_and_a_rerender_is_identical(pipe, name: str) -> None:
    first = _render(pipe, name, ["a photo of a cat"], [7])
    again = _render(pipe, name, ["a photo of a cat"], [7])
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    assert np.array_equal(first, again)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_an_image_in_a_batch_equals_it_rendered_alone(pipe, name: str) -> None:
    batch = _render(pipe, name, ["a red cube", "a photo of a cat", "a dog"], [11, 7, 13])
    alone = _render(pipe, name, ["a photo of a cat"], [7])
    np.testing.assert_allclose(batch[1], alone[0], rtol=0, atol=1e-5)


def test_dpmpp_sde_noise_follows_the_scheduler_seed(pipe) -> None:
    base = _render(pipe, "DPM++ SDE", ["a photo of a cat"], [7])
    pipe.scheduler = make_scheduler("DPM++ SDE", BASE_CONFIGS[id(pipe)], seed=8)
    other_noise = pipe("a photo of a cat", num_inference_steps=4, output_type="np", width=64, height=64,
                       generator=torch.Generator().manual_seed(7)).images
    pipe.scheduler = DPMSolverSDEScheduler.from_config(
        BASE_CONFIGS[id(pipe)], timestep_spacing="linspace", noise_sampler_seed=7)
    fresh = pipe("a photo of a cat", num_inference_steps=4, output_type="np", width=64, height=64,
                 generator=torch.Generator().manual_seed(7)).images
    assert not np.array_equal(base, other_noise)
    assert np.array_equal(base, fresh)  # the cached, re-seeded copy behaves as a freshly built scheduler
