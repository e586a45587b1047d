"""Issue 22's workflow options: save every N steps, gradient clipping and clip skip (training side)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from storage.layout import SweepLayout
from tasks.data.dataset import scan_dataset
from tasks.models.base_model import load_pipeline
from tasks.models.text_conditioning import encode_captions, text_encoders
from tasks.preflight import prepare_inputs
from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.plan import TrainingRunSpec, training_runs
from tasks.train.loop import fit_lora
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data
from tests.fault_injection import assert_resumes_bit_identically


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("workflow")
    inputs = prepare_inputs(parse_spec(small_sweep_data(out)))
    return out, inputs, scan_dataset(Path(inputs.dataset_path))


def spec_data(out: Path, **training: object) -> dict:
    data = small_sweep_data(out, ranks=[2], max_steps=4, learning_rate=1e-2)
    data["training"].pop("checkpoint_steps")
    data["training"].update({k: v for k, v in training.items() if v is not None})
    return data


def make_run(world, **training: object) -> TrainingRunSpec:
    out, inputs, _ = world
    spec = parse_spec(spec_data(out, **{"checkpoint_steps": [4], **training}))
    return training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]


def lora_after(world, run: TrainingRunSpec) -> tuple[dict[str, torch.Tensor], list[float]]:
    _, inputs, items = world
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    history = fit_lora(pipe, run, items, device="cpu")
    return get_peft_model_state_dict(pipe.unet, adapter_name="default"), history.grad_norms


def bad(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return str(info.value)


def test_checkpoint_every_resolves_to_the_steps_a_spec_would_list(world) -> None:
    out, inputs, _ = world
    paths = (inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)
    data = spec_data(out, max_steps=12, checkpoint_every=5)
    every = training_runs(parse_spec(data), *paths)[0]
    assert every.checkpoint_steps == (5, 10, 12)  # every 5th step, and max_steps so the end is saved
    listed = training_runs(parse_spec(spec_data(out, max_steps=12, checkpoint_steps=[12, 10, 5])), *paths)[0]
    assert every.run_id == listed.run_id
    union = training_runs(parse_spec(spec_data(out, max_steps=12, checkpoint_every=6, checkpoint_steps=[1, 6])),
                          *paths)[0]
    assert union.checkpoint_steps == (1, 6, 12)


@pytest.mark.parametrize(("training", "expected"), [
    ({}, "checkpoint_steps is missing; allowed: a list of steps from 1 to max_steps, or checkpoint_every = N"),
    ({"checkpoint_every": 9}, "checkpoint_every 9 exceeds max_steps 4; allowed: 1 to 4"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"checkpoint_steps": [4], "max_grad_norm": 0}, "max_grad_norm"),
    ({"checkpoint_steps": [4], "clip_skip": 0}, "clip_skip"),
    ({"checkpoint_steps": [4], "clip_skip": 13}, "clip_skip"),
])
def test_bad_workflow_options_are_refused_before_work(tmp_path: Path, training: dict, expected: str) -> None:
    message = bad(spec_data(tmp_path, **training))
    assert expected in message
    if "max_grad_norm" in training:
        assert "greater than 0" in message
    if "clip_skip" in training:
        assert ("greater than or equal to 1" in message) or ("less than or equal to 12" in message)


def test_new_options_enter_run_ids_only_when_used(world) -> None:
    plain = make_run(world)
    assert make_run(world, clip_skip=1).run_id == plain.run_id
    assert make_run(world, max_grad_norm=1.0).run_id != plain.run_id
    assert make_run(world, clip_skip=2).run_id != plain.run_id


def test_gradient_clipping_changes_weights_only_when_it_bites(world) -> None:
    plain, norms = lora_after(world, make_run(world))
    huge, huge_norms = lora_after(world, make_run(world, max_grad_norm=1e6))
    tiny, tiny_norms = lora_after(world, make_run(world, max_grad_norm=1e-3))
    assert len(norms) == 4 and all(n > 1e-3 for n in norms)
    assert huge_norms == norms  # the pre-clip norm is recorded, and clipping far above it changes nothing
    assert all(torch.equal(plain[k], huge[k]) for k in plain)
    assert tiny_norms[0] == norms[0]  # the first step's gradients are the same; clipping then changes the step
    assert any(not torch.equal(plain[k], tiny[k]) for k in plain)


def test_clip_skip_conditions_on_an_earlier_layer(world) -> None:
    _, inputs, _ = world
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    encoders, tokenizers = text_encoders(pipe)
    last, _ = encode_captions(["a photo of zqx"], encoders, tokenizers, "cpu")
    skip2, _ = encode_captions(["a photo of zqx"], encoders, tokenizers, "cpu", clip_skip=2)
    assert last.shape == skip2.shape and not torch.allclose(last, skip2)
    layers = encoders[0].config.num_hidden_layers
    with pytest.raises(ValueError, match=f"clip_skip {layers + 1} exceeds this text encoder's {layers} layers"):
        encode_captions(["a photo of zqx"], encoders, tokenizers, "cpu", clip_skip=layers + 1)


def test_a_clipped_clip_skip_run_records_both_and_resumes_bit_identically(world, tmp_path: Path) -> None:
    _, inputs, _ = world
    data = spec_data(tmp_path, checkpoint_every=2, max_grad_norm=0.5, clip_skip=2)
    run = training_runs(parse_spec(data), inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    layout = SweepLayout(Path(run.sweep_root))
    train_lora(run)
    losses = pq.read_table(layout.table_file("losses", run.run_id)).to_pylist()
    assert [row["step"] for row in losses] == [1, 2, 3, 4]
    assert all(row["grad_norm"] is not None and row["grad_norm"] > 0 for row in losses)
    runs_row = pq.read_table(layout.table_file("runs", run.run_id)).to_pylist()[0]
    assert (runs_row["max_grad_norm"], runs_row["clip_skip"]) == (0.5, 2)
    folder = layout.checkpoint_dir(run.run_id, 4)
    with safe_open(str(folder / f"{run.run_id}-s4.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_max_grad_norm"], meta["ss_clip_skip"]) == ("0.5", "2")
    assert_resumes_bit_identically(train_lora, run, layout, 4, losses)  # killed after its step-2 checkpoint


def test_unset_options_write_what_sd_scripts_writes_for_them(world, tmp_path: Path) -> None:
    _, inputs, _ = world
    run = training_runs(parse_spec(spec_data(tmp_path, checkpoint_steps=[2], max_steps=2)), inputs.model_paths,
                        inputs.dataset_path, inputs.dataset_fingerprint)[0]
    assert (run.max_grad_norm, run.clip_skip) == (None, 1)
    train_lora(run)
    folder = SweepLayout(Path(run.sweep_root)).checkpoint_dir(run.run_id, 2)
    with safe_open(str(folder / f"{run.run_id}-s2.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_max_grad_norm"], meta["ss_clip_skip"]) == ("0.0", "None")  # 0.0: kohya's "no clipping"
