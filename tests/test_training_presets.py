"""Training options in the spec: validation of every new key, target presets, the memory-aware
preset, and run ids that change exactly when an option does."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.preflight import training_resolution
from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.plan import training_runs
from tasks.sweep.presets import TARGET_PRESETS, memory_preset
from tests.conftest import small_sweep_data

PATHS = ({"tiny-sd15": "/models/tiny"}, "/data/world", "fp")


def runs_for(tmp_path: Path, **training: object):
    return training_runs(parse_spec(small_sweep_data(tmp_path, **training)), *PATHS)


def problems_for(tmp_path: Path, **training: object) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(small_sweep_data(tmp_path, **training), "test.toml")
    return str(info.value)


def test_every_bad_option_value_is_reported_at_once_with_field_value_and_allowed(tmp_path: Path) -> None:
    message = problems_for(tmp_path, lora_dropout=1.5, target_preset="all", lr_scheduler="cosin", lr_warmup_steps=-1,
                           gradient_accumulation_steps=0, min_snr_gamma=0, noise_offset=-0.1, mixed_precision="fp8",
                           gradient_checkpointing="maybe", optimizer="sgd", text_encoder_lr=2, memory_preset_gib=2)
    assert "12 problem(s)" in message
    for fragment in ("training.lora_dropout: got 1.5; Input should be less than 1",
                     "training.target_preset: got 'all'; Input should be 'attention', 'attention+ff' or 'locon'",
                     "training.lr_scheduler: got 'cosin'; Input should be 'constant', 'constant_with_warmup', 'linear', "
                     "'cosine' or 'cosine_with_restarts'",
                     "training.lr_warmup_steps: got -1; Input should be greater than or equal to 0",
                     "training.gradient_accumulation_steps: got 0; Input should be greater than or equal to 1",
                     "training.min_snr_gamma: got 0; Input should be greater than 0",
                     "training.noise_offset: got -0.1; Input should be greater than or equal to 0",
                     "training.mixed_precision: got 'fp8'; Input should be 'no', 'fp16' or 'bf16'",
                     "training.gradient_checkpointing: got 'maybe'", "training.optimizer: got 'sgd'; Input should be "
                     "'adamw' or 'adamw8bit'", "training.text_encoder_lr: got 2; Input should be less than or equal to 1",
                     "training.memory_preset_gib: got 2; Input should be greater than or equal to 4"):
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_options_that_contradict_each_other_are_reported_together(tmp_path: Path) -> None:
    message = problems_for(tmp_path, target_modules=["to_q"], target_preset="locon", lr_warmup_steps=20,
                           lr_cycles=3, text_encoder_lr=1e-4)
    for fragment in ("target_modules ['to_q'] and target_preset 'locon' are both set; allowed: one of them",
                     "lr_warmup_steps 20 exceeds max_steps 12; allowed: 0 to 12",
                     "lr_warmup_steps 20 has no effect with lr_scheduler 'constant'",
                     "lr_cycles 3 only applies to lr_scheduler 'cosine_with_restarts'",
                     "text_encoder_lr 0.0001 only applies with train_text_encoder = true"):
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_target_presets_and_explicit_lists(tmp_path: Path) -> None:
    assert runs_for(tmp_path)[0].target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    attention_ff = runs_for(tmp_path, target_preset="attention+ff")[0].target_modules
    assert set(attention_ff) == {"to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"}
    locon = runs_for(tmp_path, target_preset="locon")[0].target_modules
    assert set(attention_ff) < set(locon) and {"conv1", "conv2", "conv_shortcut"} <= set(locon)
    assert runs_for(tmp_path, target_modules=["to_k"])[0].target_modules == ("to_k",)
    assert TARGET_PRESETS["attention"] == runs_for(tmp_path, target_preset="attention")[0].target_modules


def test_default_options_keep_the_run_ids_of_runs_trained_before_they_existed(tmp_path: Path) -> None:
    assert [r.run_id for r in runs_for(tmp_path)] == ["tiny-sd15-r2-a047f36527", "tiny-sd15-r4-1cf1572c64"]


@pytest.mark.parametrize("option", [
    {"lora_dropout": 0.1}, {"target_preset": "locon"}, {"lr_scheduler": "cosine"},
    {"lr_scheduler": "linear", "lr_warmup_steps": 2}, {"lr_scheduler": "cosine_with_restarts", "lr_cycles": 2},
    {"gradient_accumulation_steps": 2}, {"min_snr_gamma": 5.0}, {"noise_offset": 0.05}, {"mixed_precision": "bf16"},
    {"gradient_checkpointing": True}, {"optimizer": "adamw8bit"}, {"train_text_encoder": True},
    {"train_text_encoder": True, "text_encoder_lr": 5e-5},
], ids=lambda o: ",".join(o))
def test_changing_an_option_makes_a_new_run(tmp_path: Path, option: dict) -> None:
    plain = {r.run_id for r in runs_for(tmp_path)}
    changed = {r.run_id for r in runs_for(tmp_path, **option)}
    assert not plain & changed
    if "text_encoder_lr" in option:  # and the text encoder's own learning rate is part of the id too
        assert not changed & {r.run_id for r in runs_for(tmp_path, train_text_encoder=True)}


def test_text_encoder_lr_defaults_to_the_learning_rate_when_the_text_encoder_trains(tmp_path: Path) -> None:
    assert runs_for(tmp_path)[0].text_encoder_lr is None
    assert runs_for(tmp_path, train_text_encoder=True)[0].text_encoder_lr == 1e-3
    assert runs_for(tmp_path, train_text_encoder=True, text_encoder_lr=5e-5)[0].text_encoder_lr == 5e-5


def test_memory_preset_gives_more_to_bigger_gpus_and_explains_itself() -> None:
    previous = None
    for gib in (4, 6, 8, 10, 12, 16, 24, 40, 80):
        preset = memory_preset(gib)
        work = preset.batch_size * preset.resolution**2
        if previous is not None:
            assert work >= previous[0] and preset.rank >= previous[1], gib
            assert preset.gradient_checkpointing <= previous[2] or work > previous[0], gib
        previous = (work, preset.rank, preset.gradient_checkpointing)
        for fragment in (f"{gib} GiB", f"resolution {preset.resolution}", f"batch size {preset.batch_size}",
                         "gradient checkpointing", preset.mixed_precision, f"rank {preset.rank}"):
            assert fragment in preset.explanation, (gib, fragment)
    small, twelve, big = memory_preset(4), memory_preset(12), memory_preset(48)
    assert (small.resolution, small.batch_size, small.gradient_checkpointing, small.mixed_precision, small.rank) == (
        512, 1, True, "fp16", 8)
    assert (twelve.batch_size, twelve.gradient_checkpointing, twelve.rank) == (4, True, 32)
    assert (big.batch_size, big.gradient_checkpointing, big.mixed_precision) == (16, False, "bf16")


def test_sdxl_needs_more_memory_than_sd15() -> None:
    sdxl = memory_preset(12, "sdxl")
    assert sdxl.resolution == 1024 and sdxl.batch_size == 1 and sdxl.gradient_checkpointing
    assert sdxl.rank < memory_preset(12, "sd15").rank
    with pytest.raises(ValueError, match=r"8 GiB is below the smallest sdxl preset \(10 GiB\); allowed: 10 GiB or more"):
        memory_preset(8, "sdxl")
    with pytest.raises(ValueError, match="allowed: 4 GiB or more"):
        memory_preset(3)


def test_memory_preset_in_the_spec_fills_only_what_the_user_left_out(tmp_path: Path) -> None:
    data = small_sweep_data(tmp_path, memory_preset_gib=12, batch_size=2)
    for key in ("ranks", "resolution"):
        del data["training"][key]
    training = parse_spec(data).training
    assert training.ranks is None  # the spec keeps what the user wrote; the plan applies the preset
    assert {"memory_preset_gib", "batch_size"} <= training.model_fields_set
    assert "resolution" not in training.model_fields_set
    run = training_runs(parse_spec(data), *PATHS)[0]
    assert run.memory_preset == memory_preset(12) and run.batch_size == 2  # set in the spec: wins over the preset's 4
    assert (run.rank, run.resolution, run.gradient_checkpointing, run.mixed_precision) == (32, 512, True, "fp16")
    # the record is not part of the id: the same resolved settings are the same run
    explicit = small_sweep_data(tmp_path, batch_size=2, ranks=[32], resolution=512, gradient_checkpointing=True,
                                mixed_precision="fp16")
    assert training_runs(parse_spec(explicit), *PATHS)[0].run_id == run.run_id


def sdxl_folder(tmp_path: Path) -> str:
    """Just enough of an SDXL diffusers folder for the plan to read its family."""
    folder = tmp_path / "sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    return str(folder)


def test_memory_preset_plans_for_each_base_models_family(tmp_path: Path) -> None:
    data = small_sweep_data(tmp_path, memory_preset_gib=24)
    for key in ("ranks", "resolution", "batch_size"):
        del data["training"][key]
    data["base_models"].append({"name": "xl", "path": "/models/xl"})
    paths = ({"tiny-sd15": "/models/tiny", "xl": sdxl_folder(tmp_path)}, "/data/world", "fp")
    sd15, sdxl = training_runs(parse_spec(data), *paths)
    assert sd15.memory_preset == memory_preset(24, "sd15") and sdxl.memory_preset == memory_preset(24, "sdxl")
    assert (sd15.resolution, sd15.batch_size, sd15.rank, sd15.mixed_precision) == (512, 8, 64, "bf16")
    assert (sdxl.resolution, sdxl.batch_size, sdxl.rank, sdxl.gradient_checkpointing) == (1024, 2, 32, True)
    assert sdxl.run_id.startswith("xl-r32-") and sd15.run_id.startswith("tiny-sd15-r64-")
    assert training_resolution(parse_spec(data), paths[0], []) == 1024  # the demo dataset is made at the largest
    # A key set in the spec wins for every family.
    data["training"].update(resolution=256, ranks=[4])
    sd15, sdxl = training_runs(parse_spec(data), *paths)
    assert (sd15.resolution, sd15.rank, sdxl.resolution, sdxl.rank) == (256, 4, 256, 4)
    assert (sd15.batch_size, sdxl.batch_size) == (8, 2)  # still the preset's, per family


def test_ranks_may_be_left_out_only_with_a_memory_preset(tmp_path: Path) -> None:
    data = small_sweep_data(tmp_path)
    del data["training"]["ranks"]
    with pytest.raises(SpecError) as info:
        parse_spec(data, "test.toml")
    assert ("training: ranks is missing; allowed: a list of LoRA ranks, or leave it out and set memory_preset_gib "
            "(the preset then picks the rank)") in str(info.value)
    data["training"]["memory_preset_gib"] = 6
    assert [run.rank for run in training_runs(parse_spec(data), *PATHS)] == [16]


def test_moving_the_preset_into_the_plan_kept_every_sd15_run_id(tmp_path: Path) -> None:
    # Pinned with the spec-level preset, before it moved to the plan.
    assert [r.run_id for r in runs_for(tmp_path, batch_size=4, mixed_precision="bf16")] == [
        "tiny-sd15-r2-469bd66701", "tiny-sd15-r4-4619afa820"]
    data = small_sweep_data(tmp_path, memory_preset_gib=12)
    for key in ("ranks", "resolution"):
        del data["training"][key]
    assert [r.run_id for r in training_runs(parse_spec(data), *PATHS)] == ["tiny-sd15-r32-2a42a85b48"]
