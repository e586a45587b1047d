"""LoCon's own rank and alpha for the k x k convolutions (training.conv_rank / conv_alpha, kohya's conv_dim /
conv_alpha): peft trains them at that rank and scale, the kohya file carries them (alpha per module, ss_network_args),
the size estimate counts them, a reloaded checkpoint renders as trained, and a spec without them is unchanged."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

from tasks.data.dataset import scan_dataset
from tasks.lora.export import save_checkpoint
from tasks.lora.files import DIFFUSERS_FILE
from tasks.lora.kohya_metadata import TrainingFacts
from tasks.lora.networks import load_weight_patches
from tasks.lora.size import adapter_params
from tasks.models.base_model import load_pipeline
from tasks.preflight import prepare_inputs
from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.plan import training_runs
from tasks.train.loop import ADAPTER, add_adapters
from tests.conftest import small_sweep_data

RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 2.0, 2, 3.0  # alpha != rank and conv_alpha != conv_rank: a lost one shows


def planned(out: Path, **training: object):
    spec = parse_spec(small_sweep_data(out, **{"ranks": [RANK], "alpha": ALPHA, **training}))
    inputs = prepare_inputs(spec)
    return inputs, training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)


def render(pipe) -> np.ndarray:
    return pipe("a photo of zqx", num_inference_steps=3, guidance_scale=7.0, width=64, height=64, output_type="np",
                generator=torch.Generator().manual_seed(7)).images[0]


def spatial(layer: BaseTunerLayer) -> bool:
    base = layer.get_base_layer()
    return isinstance(base, torch.nn.Conv2d) and base.kernel_size != (1, 1)


@pytest.fixture(scope="module", params=["lora", "loha"])
def saved(request, tmp_path_factory: pytest.TempPathFactory):
    """A LoCon adapter with conv_rank / conv_alpha, random (non-zero) weights, saved as a checkpoint."""
    network = request.param
    out = tmp_path_factory.mktemp(f"conv-{network}")
    inputs, runs = planned(out, network=network, target_preset="locon", conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA,
                           max_steps=1, checkpoint_steps=[1])
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    pipe.set_progress_bar_config(disable=True)
    params = add_adapters(pipe.unet, [], runs[0])
    generator = torch.Generator().manual_seed(0)
    std = 0.3 if network == "loha" else 0.1  # LoHa multiplies two factors' entries
    for param in params:  # an untrained adapter changes nothing; these weights change every adapted layer
        param.data = torch.randn(param.shape, generator=generator) * std
    pipe.unet.eval()
    facts = TrainingFacts(tuple(scan_dataset(Path(inputs.dataset_path))), datetime.now(UTC))
    folder = save_checkpoint(runs[0], pipe.unet, ADAPTER, 1, "ckpt", out / "ckpt", training_state={}, facts=facts)
    return network, inputs, runs[0], pipe, params, folder


def test_peft_trains_the_convolutions_at_their_own_rank_and_scale(saved) -> None:
    _, inputs, run, pipe, params, _ = saved
    layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    convs = [m for m in layers if spatial(m)]
    assert convs and len(convs) < len(layers)
    for layer in layers:
        rank, alpha = (CONV_RANK, CONV_ALPHA) if spatial(layer) else (RANK, ALPHA)
        assert (layer.r[ADAPTER], layer.scaling[ADAPTER]) == (rank, alpha / rank)
    assert adapter_params(Path(inputs.model_paths["tiny-sd15"]), run) == sum(p.numel() for p in params)


def test_the_kohya_file_carries_each_modules_alpha_and_the_conv_args(saved) -> None:
    network, _, _, pipe, _, folder = saved
    tensors = load_file(str(folder / "ckpt.safetensors"))
    with safe_open(str(folder / "ckpt.safetensors"), "pt") as handle:
        args = json.loads(handle.metadata()["ss_network_args"])
    assert (args["conv_dim"], args["conv_alpha"]) == (str(CONV_RANK), str(CONV_ALPHA))
    checked = 0
    for name, layer in pipe.unet.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        module = "lora_unet_" + name.replace(".", "_")
        rank, alpha = (CONV_RANK, CONV_ALPHA) if spatial(layer) else (RANK, ALPHA)
        assert float(tensors[f"{module}.alpha"]) == alpha, module
        if network == "lora":  # the weight change A1111 and ComfyUI compute: up @ down x alpha / down's rank
            up, down = tensors[f"{module}.lora_up.weight"], tensors[f"{module}.lora_down.weight"]
            assert down.shape[0] == rank
            base = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=[ADAPTER])
            trained = layer.get_base_layer().weight.detach() - base
            layer.unmerge()
            change = (up.flatten(1) @ down.flatten(1)).reshape(base.shape) * alpha / rank
            torch.testing.assert_close(change, trained, atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked > 20


def test_a_reloaded_checkpoint_renders_as_trained(saved) -> None:
    network, inputs, _, pipe, _, folder = saved
    fresh = load_pipeline(inputs.model_paths["tiny-sd15"])
    fresh.set_progress_bar_config(disable=True)
    base = render(fresh)
    if network == "lora":  # diffusers reads the convolutions' rank and alpha from the file's peft config
        fresh.load_lora_weights(str(folder), weight_name=DIFFUSERS_FILE, adapter_name="conv")
    else:
        load_weight_patches(fresh, folder, DIFFUSERS_FILE).set_weight(1.0)
    trained = render(pipe)
    assert np.abs(trained - base).max() > 0.05
    np.testing.assert_allclose(render(fresh), trained, atol=1e-4)


def test_without_conv_options_runs_are_as_before_and_with_them_new(tmp_path: Path) -> None:
    inputs, locon = planned(tmp_path, target_preset="locon")

    def runs(**training: object):
        spec = parse_spec(small_sweep_data(tmp_path, ranks=[RANK], alpha=ALPHA, target_preset="locon", **training))
        return training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)

    conv, alpha = runs(conv_rank=CONV_RANK), runs(conv_alpha=CONV_ALPHA)
    assert "conv_rank" not in locon[0].model_dump(exclude_defaults=True)
    assert len({locon[0].run_id, conv[0].run_id, alpha[0].run_id}) == 3
    assert (conv[0].conv_rank, conv[0].conv_alpha, alpha[0].conv_rank, alpha[0].conv_alpha) == (
        CONV_RANK, None, None, CONV_ALPHA)


def test_conv_options_without_a_convolution_to_adapt_are_refused_before_work(tmp_path: Path) -> None:
    def problems(**training: object) -> str:
        with pytest.raises(SpecError) as info:
            parse_spec(small_sweep_data(tmp_path, **training), "test.toml")
        return str(info.value)

    assert ("conv_rank 8 only applies to convolution layers, and the target modules ['to_q', 'to_k', 'to_v', "
            "'to_out.0'] have none; allowed: target_preset = 'locon', or target_modules naming a k x k convolution "
            "(conv1, conv2, conv, conv_in, conv_out), or leave conv_rank and conv_alpha out") in problems(conv_rank=8)
    assert "conv_alpha 2.0 only applies to convolution layers" in problems(target_modules=["to_q", "conv_shortcut"],
                                                                           conv_alpha=2.0)
    assert "training.conv_rank: got 0; Input should be greater than or equal to 1" in problems(
        target_preset="locon", conv_rank=0)
    parse_spec(small_sweep_data(tmp_path, target_modules=["to_q", "resnets.0.conv1"], conv_rank=2))  # a conv: fine
