"""Each training option changes what the loop does, observably, on the tiny model (CPU, a few steps)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from peft.tuners.lora import Conv2d as LoraConv2d
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from storage.layout import SweepLayout
from tasks.data.dataset import scan_dataset
from tasks.lora.files import MANIFEST_FILE
from tasks.models.base_model import load_pipeline
from tasks.preflight import prepare_inputs
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import TrainingRunSpec, training_runs
from tasks.train.loop import fit_lora
from tasks.train.objective import diffusion_loss, sample_noise
from tasks.train.run import train_lora
from tasks.train.support import check_training_support
from tests.conftest import small_sweep_data

LR = 1e-2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("options")
    inputs = prepare_inputs(parse_spec(small_sweep_data(out)))
    return out, inputs, scan_dataset(Path(inputs.dataset_path))


def make_run(world, **training: object) -> TrainingRunSpec:
    out, inputs, _ = world
    settings = {"ranks": [2], "max_steps": 4, "checkpoint_steps": [4], "learning_rate": LR, **training}
    spec = parse_spec(small_sweep_data(out, **settings))
    return training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]


def fit(world, run: TrainingRunSpec, prepare=None):
    """Train `run` in memory; `prepare(pipe)` may hook modules first. Returns pipe, losses, learning rates."""
    _, inputs, items = world
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    pipe.set_progress_bar_config(disable=True)
    if prepare:
        prepare(pipe)
    history = fit_lora(pipe, run, items, device="cpu")
    return pipe, history.losses, history.learning_rates


def lora_weights(pipe) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(pipe.unet, adapter_name="default")


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def expected_lr(name: str, step: int, warmup: int, total: int, cycles: int = 1) -> float:
    """The schedules written out by hand; `step` counts from 0 (the first optimizer step)."""
    if step < warmup:
        return LR * step / warmup
    progress = (step - warmup) / (total - warmup)
    factor = {"constant_with_warmup": 1.0, "linear": 1 - progress,
              "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
              "cosine_with_restarts": 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))}[name]
    return LR * factor


@pytest.mark.parametrize(("name", "warmup", "cycles"), [("constant_with_warmup", 2, 1), ("linear", 2, 1),
                                                        ("cosine", 1, 1), ("cosine_with_restarts", 0, 2)])
def test_lr_schedule_gives_the_expected_learning_rate_at_every_step(world, name: str, warmup: int, cycles: int) -> None:
    run = make_run(world, max_steps=6, checkpoint_steps=[6], lr_scheduler=name, lr_warmup_steps=warmup, lr_cycles=cycles)
    _, _, learning_rates = fit(world, run)
    assert learning_rates == pytest.approx([expected_lr(name, s, warmup, 6, cycles) for s in range(6)], abs=1e-12)
    assert len(set(learning_rates)) > 2


def test_constant_schedule_keeps_the_learning_rate(world) -> None:
    assert fit(world, make_run(world))[2] == [LR] * 4


def test_min_snr_weighting_matches_a_hand_computation() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([5, 500, 990])
    prediction, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    per_example = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    alpha_bar = torch.cumprod(1 - torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64), 0)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    expected = (per_example * torch.minimum(snr, torch.tensor(5.0)) / snr).mean()
    got = diffusion_loss(prediction, target, timesteps, scheduler, 5.0)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert float(got) < float(per_example.mean()) * 0.9  # the low-noise timestep (SNR >> 5) is down-weighted
    assert float(diffusion_loss(prediction, target, timesteps, scheduler, None)) == pytest.approx(float(per_example.mean()))
    v_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    expected_v = (per_example * torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)).mean()
    assert float(diffusion_loss(prediction, target, timesteps, v_scheduler, 5.0)) == pytest.approx(float(expected_v), rel=1e-5)


def test_min_snr_changes_the_training_loss_and_a_huge_gamma_changes_nothing(world) -> None:
    _, plain, _ = fit(world, make_run(world, max_steps=2, checkpoint_steps=[2]))
    _, weighted, _ = fit(world, make_run(world, max_steps=2, checkpoint_steps=[2], min_snr_gamma=1.0))
    _, unweighted, _ = fit(world, make_run(world, max_steps=2, checkpoint_steps=[2], min_snr_gamma=1e12))
    assert weighted[0] != pytest.approx(plain[0], rel=1e-3)
    assert unweighted == pytest.approx(plain, rel=1e-5)  # every weight min(SNR, gamma) / SNR is 1


def test_noise_offset_shifts_each_image_channel_by_one_random_amount() -> None:
    plain = sample_noise(torch.Size([64, 4, 8, 8]), torch.Generator().manual_seed(0), 0.0)
    offset = sample_noise(torch.Size([64, 4, 8, 8]), torch.Generator().manual_seed(0), 0.1)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # constant over height and width
    assert float(shift[:, :, 0, 0].std()) == pytest.approx(0.1, rel=0.2)


def test_noise_offset_changes_the_training_loss(world) -> None:
    _, plain, _ = fit(world, make_run(world, max_steps=2, checkpoint_steps=[2]))
    _, offset, _ = fit(world, make_run(world, max_steps=2, checkpoint_steps=[2], noise_offset=0.5))
    assert offset[0] != pytest.approx(plain[0], rel=1e-3)


def test_two_accumulated_batches_of_2_train_like_one_batch_of_4(world) -> None:
    whole, whole_losses, _ = fit(world, make_run(world, batch_size=4, max_steps=3, checkpoint_steps=[3]))
    parts, part_losses, _ = fit(world, make_run(world, batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                                                checkpoint_steps=[3]))
    single, _, _ = fit(world, make_run(world, batch_size=2, max_steps=3, checkpoint_steps=[3]))
    assert part_losses == pytest.approx(whole_losses, rel=1e-4)
    for key, value in lora_weights(whole).items():
        torch.testing.assert_close(lora_weights(parts)[key], value, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(lora_weights(single)[k], v, atol=1e-5) for k, v in lora_weights(whole).items())


def test_lora_dropout_is_applied_while_training(world) -> None:
    dropped, dropped_losses, _ = fit(world, make_run(world, lora_dropout=0.5))
    plain, plain_losses, _ = fit(world, make_run(world))
    layer = dropped.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.lora_dropout["default"].p == 0.5
    assert dropped_losses[0] == plain_losses[0]  # LoRA B starts at 0: dropout cannot matter yet...
    assert dropped_losses[1:] != pytest.approx(plain_losses[1:], rel=1e-6)  # ...but it does once B has moved


def test_locon_preset_adds_lora_to_the_resnet_convolutions(world) -> None:
    pipe, _, _ = fit(world, make_run(world, target_preset="locon", max_steps=1, checkpoint_steps=[1]))
    conv = [name for name, m in pipe.unet.named_modules() if isinstance(m, LoraConv2d)]
    assert any(name.endswith("resnets.0.conv1") for name in conv)
    assert any(name.endswith("conv_shortcut") for name in conv) and any("downsamplers" in n for n in conv)
    plain, _, _ = fit(world, make_run(world, max_steps=1, checkpoint_steps=[1]))
    assert not any(isinstance(m, LoraConv2d) for m in plain.unet.modules())
    assert len(lora_weights(pipe)) > 2 * len(lora_weights(plain))


def test_gradient_checkpointing_recomputes_the_forward_pass_and_trains_the_same(world) -> None:
    def hook(calls):  # an up block: the gradient reaches the attention LoRA through it, so it is recomputed
        return lambda pipe: calls.append(count_calls(pipe.unet.up_blocks[0].resnets[0].conv1))

    plain_calls, checkpointed_calls = [], []
    plain, _, _ = fit(world, make_run(world), hook(plain_calls))
    checkpointed, _, _ = fit(world, make_run(world, gradient_checkpointing=True), hook(checkpointed_calls))
    assert plain_calls[0] == [4] and checkpointed_calls[0] == [8]  # forward, then again in the backward pass
    for key, value in lora_weights(plain).items():
        torch.testing.assert_close(lora_weights(checkpointed)[key], value, rtol=1e-5, atol=1e-7)
    assert not checkpointed.unet.is_gradient_checkpointing  # off again for rendering


def test_bf16_mixed_precision_runs_the_unet_in_bf16_and_keeps_lora_weights_in_fp32(world) -> None:
    dtypes: list[torch.dtype] = []

    def hook(pipe):
        layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        layer.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))

    pipe, losses, _ = fit(world, make_run(world, mixed_precision="bf16"), hook)
    assert set(dtypes) == {torch.bfloat16} and all(math.isfinite(x) for x in losses)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    _, plain_losses, _ = fit(world, make_run(world))
    assert losses == pytest.approx(plain_losses, rel=0.05) and losses != plain_losses


def test_training_task_loads_the_unet_in_bf16_to_the_same_lora_as_an_fp32_load(world, monkeypatch) -> None:
    """The task loads the UNet straight in the half dtype (an SDXL UNet never sits on the GPU in fp32); the
    trained LoRA is the one fit_lora makes from an fp32 pipeline that setup casts."""
    run = make_run(world, mixed_precision="bf16", max_steps=2, checkpoint_steps=[2])
    pipe, _, _ = fit(world, run)
    expected = lora_weights(pipe)
    loaded: list[tuple[torch.dtype, torch.dtype]] = []

    def recording_load(*args, **kwargs):
        pipe = load_pipeline(*args, **kwargs)
        loaded.append((pipe.unet.dtype, pipe.vae.dtype))
        return pipe

    monkeypatch.setattr("tasks.train.run.load_pipeline", recording_load)
    ckpt = train_lora(run).checkpoints[-1]
    assert loaded == [(torch.bfloat16, torch.float32)]
    state = torch.load(Path(ckpt.lora_dir) / "training_state.pt", weights_only=False)["lora"]
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize(("option", "message"), [
    ({"mixed_precision": "fp16"}, "training.mixed_precision = 'fp16' needs a CUDA GPU and this machine trains on the "
                                  "CPU; allowed here: 'bf16' or 'no'"),
    ({"optimizer": "adamw8bit"}, "training.optimizer = 'adamw8bit' needs a CUDA GPU"),
])
def test_options_this_machine_cannot_run_fail_before_any_model_is_loaded(world, monkeypatch, option, message) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks what a CPU-only machine says")
    run = make_run(world, **option)
    with pytest.raises(ValueError) as info:
        check_training_support(run, "cpu")
    assert message in str(info.value)
    monkeypatch.setattr("tasks.train.run.load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=next(iter(option))):
        train_lora(run)
    assert not SweepLayout(Path(run.sweep_root)).run_dir(run.run_id).exists()


def test_text_encoder_lora_trains_with_its_own_learning_rate_and_runs_every_step(world) -> None:
    calls: list[list[int]] = []
    captions = len(world[2])  # encoded one by one at the start (cache "memory": never read from disk)
    run = make_run(world, train_text_encoder=True, text_encoder_lr=3e-3, gradient_accumulation_steps=2,
                   cache="memory")
    pipe, _, _ = fit(world, run, lambda p: calls.append(count_calls(p.text_encoder)))
    assert calls[0] == [captions + 4 * 2]  # the cached captions once, then every micro-batch
    te_lora = get_peft_model_state_dict(pipe.text_encoder, adapter_name="default")
    assert te_lora and all(v.abs().max() > 0 for k, v in te_lora.items() if "lora_B" in k)  # B moved from 0
    frozen, _, _ = fit(world, make_run(world, cache="memory"), lambda p: calls.append(count_calls(p.text_encoder)))
    assert calls[1] == [captions]


def test_checkpoint_records_every_option_in_kohya_metadata_and_checkpoint_json(world, caplog) -> None:
    caplog.set_level(logging.INFO)
    options = dict(lora_dropout=0.1, lr_scheduler="cosine", lr_warmup_steps=1, gradient_accumulation_steps=2,
                   min_snr_gamma=5.0, noise_offset=0.05, mixed_precision="bf16", gradient_checkpointing=True,
                   train_text_encoder=True, text_encoder_lr=5e-4, target_preset="locon", max_steps=2,
                   checkpoint_steps=[2], memory_preset_gib=12, batch_size=1, resolution=64)
    run = make_run(world, **options)
    ckpt = train_lora(run).checkpoints[-1]
    with safe_open(str(Path(ckpt.lora_dir) / f"{ckpt.checkpoint_id}.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert {k: meta[k] for k in ("ss_network_dropout", "ss_lr_scheduler", "ss_lr_warmup_steps",
                                 "ss_gradient_accumulation_steps", "ss_min_snr_gamma", "ss_noise_offset",
                                 "ss_mixed_precision", "ss_gradient_checkpointing", "ss_text_encoder_lr", "ss_unet_lr",
                                 "ss_optimizer", "ss_network_train_unet_only", "ss_total_batch_size")} == {
        "ss_network_dropout": "0.1", "ss_lr_scheduler": "cosine", "ss_lr_warmup_steps": "1",
        "ss_gradient_accumulation_steps": "2", "ss_min_snr_gamma": "5.0", "ss_noise_offset": "0.05",
        "ss_mixed_precision": "bf16", "ss_gradient_checkpointing": "True", "ss_text_encoder_lr": "0.0005",
        "ss_unet_lr": str(LR), "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.01)",
        "ss_network_train_unet_only": "False", "ss_total_batch_size": "2"}
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3.0"}
    assert any(k.startswith("lora_unet_") and "conv" in k for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    manifest = json.loads((Path(ckpt.lora_dir) / MANIFEST_FILE).read_text())
    assert manifest["attention_processors"] == ["AttnProcessor2_0"]  # torch scaled_dot_product_attention
    recorded = manifest["run"]
    assert {k: recorded[k] for k in options if k in recorded} == {k: v for k, v in options.items() if k in recorded}
    preset = recorded["memory_preset"]
    assert (preset["gib"], preset["batch_size"], preset["rank"], preset["mixed_precision"]) == (12, 4, 32, "fp16")
    assert "12 GiB" in preset["explanation"] and preset["explanation"] in caplog.text
    assert "the spec's own values win over the preset" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_fp16_with_loss_scaling_and_checkpointing_trains_on_cuda(world, optimizer: str) -> None:
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    _, inputs, items = world
    run = make_run(world, mixed_precision="fp16", gradient_checkpointing=True, optimizer=optimizer)
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"], device="cuda")
    losses = fit_lora(pipe, run, items, device="cuda").losses
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    weights = lora_weights(pipe)
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)


def test_validation_loss_is_measured_on_held_out_images_at_every_checkpoint(world) -> None:
    import pyarrow.parquet as pq

    from tasks.lora.files import DIFFUSERS_FILE
    from tasks.train.validation import prepare_validation, split_validation, validation_loss

    _, inputs, items = world
    run = make_run(world, max_steps=6, checkpoint_steps=[3, 6], validation_images=2)
    result = train_lora(run)
    layout = SweepLayout(Path(run.sweep_root))
    rows = sorted(pq.read_table(layout.table_file("checkpoints", run.run_id)).to_pylist(), key=lambda r: r["step"])
    values = [r["validation_loss"] for r in rows]
    assert all(math.isfinite(v) for v in values) and values[0] != values[1], values
    assert pq.read_table(layout.table_file("runs", run.run_id)).to_pylist()[0]["num_images"] == len(items) - 2

    training, held = split_validation(items, 2, run.seed)
    assert len(held) == 2 and {h.path for h in held}.isdisjoint(t.path for t in training)
    assert split_validation(items, 2, run.seed) == (training, held)  # chosen by the seed, not by chance
    # Fixed timesteps and noise: the reloaded final LoRA measures the recorded value again.
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    pipe.load_lora_weights(result.checkpoints[-1].lora_dir, weight_name=DIFFUSERS_FILE, adapter_name="v")
    validation = prepare_validation(pipe, held, run.resolution, run.seed, "cpu")
    assert validation_loss(pipe, validation, "cpu") == pytest.approx(values[-1], rel=1e-4)
    pipe.set_adapters(["v"], adapter_weights=[0.0])  # and without the LoRA it differs
    assert validation_loss(pipe, validation, "cpu") != pytest.approx(values[-1], rel=1e-4)


def test_holding_out_every_image_is_refused_before_any_work(world, tmp_path: Path) -> None:
    from tasks.preflight import InputError

    spec = parse_spec(small_sweep_data(tmp_path / "out", validation_images=12))
    with pytest.raises(InputError, match=r"training.validation_images = 12 leaves no training image \(the dataset "
                                         r"has 12\); allowed: 0 to 11"):
        prepare_inputs(spec)
